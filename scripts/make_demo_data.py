"""Make the demo's embedded data (scripts/demo_data/) from a folder laid out like shared/data.

    python scripts/make_demo_data.py ../shared/data

- c4-demo.jsonl: the first 48 documents of the C4 train slice (in file order) longer than 600 GPT-2
  tokens, as {"text": ...} rows (the C4 protocol only draws documents longer than the sequence length).
- wikitext2-test-excerpt.jsonl: the first rows of the WikiText-2 test split, as Hugging Face rows, up to
  the first row after 60,000 characters of "\\n\\n"-joined text (more than 20 windows of 512 SmolLM2
  tokens, so its first windows are the test set's).
"""

import json
import sys
from pathlib import Path

from transformers import AutoTokenizer

src = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data")
out = Path(__file__).resolve().parent / "demo_data"
tok = AutoTokenizer.from_pretrained(str(src / "tokenizers" / "gpt2"))
docs = []
for line in open(next((src / "c4").glob("c4-train.*.json*"))):
    text = json.loads(line)["text"]
    if len(tok(text).input_ids) > 600:
        docs.append(text)
    if len(docs) == 48:
        break
(out / "c4-demo.jsonl").write_text(
    "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in docs)
)
rows, n = [], 0
for line in open(src / "wikitext2-raw" / "test.jsonl"):
    rows.append(json.loads(line)["text"])
    n += len(rows[-1]) + 2
    if n > 60_000:
        break
(out / "wikitext2-test-excerpt.jsonl").write_text(
    "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in rows)
)
print(f"{len(docs)} C4 documents, {len(rows)} WikiText-2 rows")
