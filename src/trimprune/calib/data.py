"""Calibration and evaluation data: the Wanda/SparseGPT protocols on local files or hub datasets,
and sequences sampled from the model itself (`self`).

Local data: `--calib-data PATH` / `--eval-data NAME=PATH`, or a folder laid out like the project's
shared data (``c4/c4-train*.json*``, ``wikitext2-raw/test.jsonl``, ``ptb/ptb.test.txt`` ...) named
by the environment variable TRIMPRUNE_DATA. Hub names are loaded through `datasets` when it is
installed and the Hub is reachable; otherwise the error names the flag that takes a local file.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import importlib.util
import json
import os
import random
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from trimprune.config import CalibConfig
from trimprune.core.finite import blame, extrema, nonfinite
from trimprune.core.progress import Progress
from trimprune.errors import InputFileError, TrimpruneError

DATA_ENV = "TRIMPRUNE_DATA"

# file patterns inside a TRIMPRUNE_DATA folder
LAYOUT = {
    ("c4", "train"): ["c4/c4-train.*.json*"],
    ("c4", "validation"): ["c4/c4-validation.*.json*"],
    ("wikitext2", "train"): ["wikitext2-raw/train.jsonl", "wikitext2-raw/wiki.train.raw"],
    ("wikitext2", "test"): ["wikitext2-raw/test.jsonl", "wikitext2-raw/wiki.test.raw"],
    ("ptb", "train"): ["ptb/ptb.train.txt"],
    ("ptb", "test"): ["ptb/ptb.test.txt"],
}
HUB: dict[tuple[str, str], tuple[str, dict[str, object], str, str]] = {
    ("c4", "train"): (
        "allenai/c4",
        {"data_files": {"train": "en/c4-train.00000-of-01024.json.gz"}},
        "train",
        "text",
    ),
    ("c4", "validation"): (
        "allenai/c4",
        {"data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"}},
        "validation",
        "text",
    ),
    ("wikitext2", "train"): ("wikitext", {"name": "wikitext-2-raw-v1"}, "train", "text"),
    ("wikitext2", "test"): ("wikitext", {"name": "wikitext-2-raw-v1"}, "test", "text"),
    ("ptb", "train"): ("ptb_text_only", {"name": "penn_treebank"}, "train", "sentence"),
    ("ptb", "test"): ("ptb_text_only", {"name": "penn_treebank"}, "test", "sentence"),
}


@dataclass(frozen=True)
class DataFile:
    """A data file a run read: its absolute path, size in bytes and SHA-256 (hex) at reading time,
    so that a reader can tell whether a file at hand is the one the run used."""

    path: str
    bytes: int
    sha256: str

    @classmethod
    def of(cls, path: str | Path) -> DataFile:
        p = Path(path).resolve()
        st = p.stat()
        key = (str(p), st.st_size, st.st_mtime_ns)
        if key not in _HASHES:
            h = hashlib.sha256()
            with open(p, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            _HASHES[key] = h.hexdigest()
        return cls(str(p), st.st_size, _HASHES[key])

    def to_dict(self) -> dict:
        return {"path": self.path, "bytes": self.bytes, "sha256": self.sha256}


_HASHES: dict[tuple[str, int, int], str] = {}  # (path, size, mtime) -> sha256, per process


@dataclass(frozen=True)
class CalibrationData:
    """Where a run's calibration sequences came from and how they were drawn: the source (c4,
    wikitext2, ptb, self), the files read (none for `self` or the Hub; `hub` then names the data
    set), and the protocol's numbers (sequences, tokens each, seed)."""

    source: str
    nsamples: int
    seqlen: int
    seed: int
    files: tuple[DataFile, ...] = ()
    hub: str | None = None

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "nsamples": self.nsamples,
            "seqlen": self.seqlen,
            "seed": self.seed,
            "files": [f.to_dict() for f in self.files],
            "hub": self.hub,
        }


def hub_name(name: str, split: str) -> str:
    """The Hub data set a `name` (`split`) is read from, e.g. "wikitext wikitext-2-raw-v1 test"."""
    repo, kw, hsplit, _ = HUB[(name, split)]
    files = kw.get("data_files", {})
    extra = kw.get("name") or (next(iter(files.values()), "") if isinstance(files, dict) else "")
    return " ".join(str(x) for x in (repo, extra, hsplit) if x)


def data_root() -> Path | None:
    v = os.environ.get(DATA_ENV)
    return Path(v) if v else None


def find_local(name: str, split: str, root: Path | None = None) -> Path | None:
    """The file of data set `name` (`split`) under `root` (default: the TRIMPRUNE_DATA folder),
    or None. A TRIMPRUNE_DATA that is not a folder (a typo) is an `InputFileError` naming it."""
    if root is None:
        root = data_root()
        if root is not None and not root.is_dir():
            raise InputFileError(
                f"{DATA_ENV}={os.environ[DATA_ENV]!r} is not a folder: set it to a folder laid "
                "out like shared/data (c4/c4-train.*.json.gz, wikitext2-raw/test.jsonl, ...), "
                "or unset it"
            )
    if root is None:
        return None
    for pat in LAYOUT.get((name, split), []):
        hits = sorted(root.glob(pat))
        if hits:
            return hits[0]
    return None


def detect_format(path: Path, fmt: str | None = None, flag: str = "{calib_data}") -> str:
    if fmt:
        return fmt
    name = path.name.lower()
    for suffix, f in (
        (".jsonl", "jsonl"),
        (".json", "jsonl"),
        (".jsonl.gz", "jsonl"),
        (".json.gz", "jsonl"),
        (".parquet", "parquet"),
        (".txt", "txt"),
        (".raw", "txt"),
    ):
        if name.endswith(suffix):
            return f
    raise TrimpruneError(
        f"{flag} {str(path)!r} has an unknown extension: add {{calib_format}} txt|jsonl|parquet"
    )


PROBE_ROWS = 16  # rows of a jsonl / parquet file parsed before the model loads
PROBE_BYTES = 1 << 16  # bytes of a text file checked for binary content before the model loads
TEXT_HINT = "give a UTF-8 .txt, a .jsonl with a text field or a .parquet file with a text column"


def _existing_file(path: str | Path, flag: str) -> Path:
    p = Path(path)
    if p.is_dir():
        raise InputFileError(
            f"{flag} {str(path)!r} is a directory: give the path of a .txt, .jsonl or .parquet "
            "file inside it"
        )
    if not p.is_file():
        raise InputFileError(
            f"{flag} {str(path)!r} does not exist: give the path of a .txt, .jsonl or .parquet file"
        )
    try:
        with open(p, "rb"):
            pass
    except OSError as e:
        raise InputFileError(
            f"{flag} {str(path)!r} cannot be read ({e.strerror or e}): check its permissions"
        ) from e
    return p


def _not_text(path, flag: str, e: UnicodeDecodeError) -> InputFileError:
    return InputFileError(
        f"{flag} {str(path)!r} is not UTF-8 text (byte {e.start} is "
        f"{e.object[e.start : e.start + 1]!r}): is it a binary file? {TEXT_HINT}"
    )


def _binary(path, flag: str, offset: int) -> InputFileError:
    return InputFileError(
        f"{flag} {str(path)!r} is a binary file (a NUL byte at offset {offset}): {TEXT_HINT}"
    )


def _empty(path, flag: str) -> InputFileError:
    return InputFileError(f"{flag} {str(path)!r} is empty (no text): {TEXT_HINT}")


def _jsonl_rows(p: Path, field: str, flag: str, limit: int | None = None) -> list[str]:
    """The `field` of each JSON line (blank lines skipped); the first `limit` only when given."""
    opener = gzip.open if p.name.endswith(".gz") else open
    rows = []
    try:
        with opener(p, "rt", encoding="utf-8") as f:
            for ln, line in enumerate(f, 1):
                if "\x00" in line:
                    raise _binary(p, flag, line.index("\x00"))
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except (json.JSONDecodeError, RecursionError):
                    raise InputFileError(
                        f"{flag} {str(p)!r} line {ln} is not JSON: use one JSON object per line "
                        "or {calib_format} txt"
                    ) from None
                if not isinstance(obj, dict) or field not in obj:
                    raise InputFileError(
                        f"{flag} {str(p)!r} line {ln} has no {field!r} field: each line needs "
                        f'{{"{field}": ...}}'
                    )
                if not isinstance(obj[field], str):
                    raise InputFileError(
                        f"{flag} {str(p)!r} line {ln}: its {field!r} is "
                        f"{type(obj[field]).__name__}, not a string of text"
                    )
                rows.append(obj[field])
                if limit is not None and len(rows) >= limit:
                    break
    except UnicodeDecodeError as e:
        raise _not_text(p, flag, e) from e
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise InputFileError(
            f"{flag} {str(p)!r} cannot be read as "
            f"{'gzip-compressed ' if opener is gzip.open else ''}JSON lines ({e}): {TEXT_HINT}"
        ) from e
    return rows


def _parquet_file(p: Path, field: str, flag: str):
    try:
        import pyarrow.parquet as pq
        from pyarrow import ArrowException
    except ImportError:
        raise InputFileError(
            f"{flag} {str(p)!r} is parquet, which needs pyarrow: `pip install pyarrow`"
        ) from None
    try:
        pf = pq.ParquetFile(p)
        schema = pf.schema_arrow
    except (ArrowException, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise InputFileError(
            f"{flag} {str(p)!r} is not a parquet file ({first}): {TEXT_HINT}"
        ) from e
    if field not in schema.names:
        raise InputFileError(
            f"{flag} {str(p)!r} has no column {field!r}: columns are {schema.names}"
        )
    import pyarrow as pa

    tp = schema.field(field).type
    if not (pa.types.is_string(tp) or pa.types.is_large_string(tp)):
        raise InputFileError(f"{flag} {str(p)!r}: column {field!r} holds {tp}, not text")
    return pf


def _parquet_rows(p: Path, field: str, flag: str, limit: int | None = None) -> list[str]:
    from pyarrow import ArrowException

    pf = _parquet_file(p, field, flag)
    try:
        if limit is not None:
            batch = next(pf.iter_batches(batch_size=limit, columns=[field]), None)
            values = [] if batch is None else batch.column(0).to_pylist()
        else:
            values = pf.read(columns=[field]).column(field).to_pylist()
    except (ArrowException, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise InputFileError(
            f"{flag} {str(p)!r} cannot be read as parquet ({first}): {TEXT_HINT}"
        ) from e
    return ["" if x is None else str(x) for x in values]


def _text(p: Path, flag: str, limit: int | None = None) -> str:
    """The file's text (its first `limit` bytes, a cut multi-byte character dropped, when given)."""
    try:
        with open(p, "rb") as f:
            data = f.read() if limit is None else f.read(limit)
    except OSError as e:
        raise InputFileError(
            f"{flag} {str(p)!r} cannot be read ({e.strerror or e}): check its permissions"
        ) from e
    if b"\x00" in data:
        raise _binary(p, flag, data.index(b"\x00"))
    try:
        return codecs.getincrementaldecoder("utf-8")().decode(data, final=limit is None)
    except UnicodeDecodeError as e:
        raise _not_text(p, flag, e) from e


def _has_text(p: Path, flag: str) -> bool:
    """Whether a text file holds anything but whitespace (read in 1 MB pieces up to its first
    text)."""
    dec = codecs.getincrementaldecoder("utf-8")()
    with open(p, "rb") as f:
        while chunk := f.read(1 << 20):
            try:
                if dec.decode(chunk).strip():
                    return True
            except UnicodeDecodeError as e:
                raise _not_text(p, flag, e) from e
    return False


def probe_rows(
    path: str | Path, fmt: str | None = None, field: str = "text", flag: str = "{calib_data}"
) -> None:
    """Before the model loads: `path` is a readable file of its format whose first rows parse and
    hold text (a text file: its first 64 KB are UTF-8 without NUL bytes, and it is not blank)."""
    p = _existing_file(path, flag)
    fmt = detect_format(p, fmt, flag)
    if fmt == "parquet":
        if not _parquet_rows(p, field, flag, PROBE_ROWS):
            raise _empty(path, flag)
    elif fmt == "jsonl":
        if not _jsonl_rows(p, field, flag, PROBE_ROWS):
            raise _empty(path, flag)
    else:
        _text(p, flag, PROBE_BYTES)
        if not _has_text(p, flag):
            raise _empty(path, flag)


def read_rows(
    path: str | Path, fmt: str | None = None, field: str = "text", flag: str = "{calib_data}"
) -> list[str]:
    """Rows of a local file: jsonl/json(.gz) -> the `field` of each object, parquet -> that column,
    txt -> one row per line (a WikiText ``.raw`` file gives the Hugging Face rows: blank lines ->
    ""). A file that is empty, binary or not of its format is an `InputFileError` naming it."""
    p = _existing_file(path, flag)
    fmt = detect_format(p, fmt, flag)
    if fmt == "jsonl":
        rows = _jsonl_rows(p, field, flag)
    elif fmt == "parquet":
        rows = _parquet_rows(p, field, flag)
    else:
        lines = _text(p, flag).splitlines(keepends=True)
        if p.name.endswith(".raw"):
            rows = [ln if ln.strip() else "" for ln in lines]
        else:
            rows = [ln.rstrip("\n") for ln in lines]
    if not any(r.strip() for r in rows):
        raise _empty(path, flag)
    return rows


def not_local(name: str, split: str, flag: str) -> str:
    """Why data set `name` (`split`) has no local file: TRIMPRUNE_DATA unset, or the folder it
    names (with its value) lacks the file; the start of an error that goes on with the fix."""
    root = data_root()
    if root is None:
        return f"{name} ({split}) is not available locally ({DATA_ENV} is not set)"
    pats = " or ".join(LAYOUT.get((name, split), [])) or "its file"
    return f"{name} ({split}) is not available locally ({DATA_ENV}={str(root)!r} has no {pats})"


def no_datasets(name: str, split: str, flag: str) -> str:
    """The one-line error when a set would come from the Hub but `datasets` is not installed."""
    return (
        f"{not_local(name, split, flag)} and the `datasets` package is not installed: "
        f"pip install datasets, set {DATA_ENV} to a folder laid out like shared/data, or give a "
        f"local file with {flag if flag.endswith('PATH') else flag + ' FILE'}"
    )


def hub_rows(name: str, split: str, flag: str) -> list[str]:
    repo, kw, hsplit, field = HUB[(name, split)]
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise TrimpruneError(no_datasets(name, split, flag)) from None
    try:
        ds = datasets.load_dataset(repo, split=hsplit, **kw)
    except Exception as e:  # offline, missing, ...
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise TrimpruneError(
            f"could not load {name} ({split}) from the Hub ({first}): give a local file "
            f"with {flag} or set {DATA_ENV}"
        ) from e
    return [str(x) for x in ds[field]]


def _field(name: str, path) -> str:
    return "sentence" if (name == "ptb" and str(path).endswith((".jsonl", ".parquet"))) else "text"


def dataset_rows(name: str, split: str, path: str | None, fmt: str | None, flag: str) -> list[str]:
    return dataset_source(name, split, path, fmt, flag)[0]


def dataset_source(
    name: str, split: str, path: str | None, fmt: str | None, flag: str
) -> tuple[list[str], str | None]:
    """(rows, the local file they were read from, or None when they came from the Hub): `path`
    when given, else the file under TRIMPRUNE_DATA, else the Hub."""
    if path is None:
        local = find_local(name, split)
        if local is not None:
            path = str(local)
    if path is not None:
        rows = read_rows(path, fmt, field=_field(name, path), flag=flag)
        if name == "ptb" and not str(path).endswith((".jsonl", ".parquet")):
            rows = [r.strip() for r in rows]
        return rows, path
    return hub_rows(name, split, flag), None


def check_source(name: str, split: str, path: str | None, fmt: str | None, flag: str) -> str:
    """Before the model loads: where the rows of data set `name` (`split`) will come from, checked:
    a local file (given, or found under TRIMPRUNE_DATA) is probed (`probe_rows`); the Hub needs
    `datasets` and a reachable Hub. Returns the file's path, or "hub"."""
    if path is None:
        local = find_local(name, split)
        path = str(local) if local is not None else None
    if path is not None:
        probe_rows(path, fmt, field=_field(name, path), flag=flag)
        return path
    if importlib.util.find_spec("datasets") is None:
        raise InputFileError(no_datasets(name, split, flag))
    from trimprune.core.hub import hub_unreachable

    why = hub_unreachable()
    if why:
        raise InputFileError(
            f"{not_local(name, split, flag)} and the Hub cannot be reached ({why}): "
            f"give a local file with {flag} or set {DATA_ENV} to a folder laid out like shared/data"
        )
    return "hub"


def check_calibration_source(config: CalibConfig) -> str | None:
    """Before the model loads: the calibration file (or the hub set) of `config` can be read; None
    for `self`."""
    if config.source == "self":
        return None
    where = check_source(config.source, "train", config.data, config.format, "{calib_data}")
    if where != "hub":
        check_long_enough(config, where)
    return where


COUNT_BYTES = 16 << 20  # calibration files up to this size are counted before the model loads
TOKEN_MARGIN = 4  # special tokens and a leading-space token a tokenizer may add to a text


def check_long_enough(config: CalibConfig, path: str) -> None:
    """Before the model loads, for a file of at most `COUNT_BYTES`: some document (C4) or the
    joined text (the other sources) can give more than --seqlen tokens. A token is at least one
    byte of text, so a text of B bytes gives at most B + `TOKEN_MARGIN` tokens."""
    p = Path(path)
    try:
        if p.stat().st_size > (COUNT_BYTES // 8 if p.name.endswith(".gz") else COUNT_BYTES):
            return
    except OSError:
        return
    rows = read_rows(p, config.format, field=_field(config.source, p), flag="{calib_data}")
    sizes = [len(r.encode("utf-8")) + TOKEN_MARGIN for r in rows]
    if config.source == "c4":
        count = sum(n > config.seqlen for n in sizes)
        if count == 0:
            raise InputFileError(
                f"{{calib_data}} {path!r}: none of its {len(rows)} documents can be longer than "
                f"{{seqlen}} {config.seqlen} tokens (the longest has {max(sizes) - TOKEN_MARGIN} "
                "bytes, and a token is at least one byte): use a smaller {seqlen}, a file with "
                "longer documents, or {calib} wikitext2"
            )
    elif sum(sizes) + len(rows) <= config.seqlen + 1:
        raise InputFileError(
            f"{{calib_data}} {path!r} holds {sum(sizes) - TOKEN_MARGIN * len(rows)} bytes of "
            f"text, too few for one window of {{seqlen}} {config.seqlen} tokens: use a smaller "
            "{seqlen} or a larger file"
        )


# ------------------------------------------------------------------------------ calibration
def _encode(tokenizer, text: str) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt", verbose=False).input_ids[0]


C4_FIRST_TRIES = 10_000  # draws of short documents before they are counted
C4_DRAWS_PER_ROW = 100  # then at most this many draws per document for one sample


def _too_few_long(count: int, rows: int, seqlen: int, draws: int) -> TrimpruneError:
    return TrimpruneError(
        f"{count} of the {rows} calibration documents are longer than {{seqlen}} {seqlen} "
        f"tokens (none drawn in {draws} draws): use a smaller {{seqlen}}, a file with longer "
        "documents, or {calib} wikitext2 (windows of the joined text)"
    )


def calib_c4(tokenizer, rows: list[str], nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """Wanda/SparseGPT C4 protocol: seeded `random`; draw documents until one is longer than
    seqlen tokens, take a random seqlen window of it. Documents are tokenized once (memoised),
    which changes nothing in the draws."""
    rng = random.Random(seed)
    cache: dict[int, torch.Tensor] = {}
    long_enough = None
    most = max(C4_FIRST_TRIES, C4_DRAWS_PER_ROW * len(rows))  # draws for one sample, at most
    out = []
    for _ in range(nsamples):
        tries = 0
        while True:
            i = rng.randint(0, len(rows) - 1)
            if i not in cache:
                cache[i] = _encode(tokenizer, rows[i])
            enc = cache[i]
            if enc.numel() > seqlen:
                break
            tries += 1
            if tries == C4_FIRST_TRIES and long_enough is None:
                long_enough = sum(
                    (cache[k] if k in cache else _encode(tokenizer, r)).numel() > seqlen
                    for k, r in enumerate(rows)
                )
            if tries == C4_FIRST_TRIES and not long_enough or tries >= most:
                raise _too_few_long(long_enough or 0, len(rows), seqlen, tries)
        j = rng.randint(0, enc.numel() - seqlen - 1)
        out.append(enc[j : j + seqlen])
    return torch.stack(out)


def calib_stream(tokenizer, text: str, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """WikiText-2 / PTB protocol: tokenize the joined text once, seeded random windows."""
    enc = _encode(tokenizer, text)
    if enc.numel() <= seqlen + 1:
        raise TrimpruneError(
            f"the calibration text has {enc.numel()} tokens, not more than {{seqlen}} {seqlen}: "
            "use a smaller {seqlen} or a larger file"
        )
    rng = random.Random(seed)
    out = []
    for _ in range(nsamples):
        i = rng.randint(0, enc.numel() - seqlen - 1)
        out.append(enc[i : i + seqlen])
    return torch.stack(out)


def bos_token_id(model, tokenizer) -> int:
    for src in (getattr(model, "generation_config", None), model.config, tokenizer):
        v = getattr(src, "bos_token_id", None) if src is not None else None
        if isinstance(v, int):
            return v
    for src in (model.config, tokenizer):
        v = getattr(src, "eos_token_id", None)
        if isinstance(v, int):
            return v
        if isinstance(v, list) and v:
            return v[0]
    return 0


@torch.no_grad()
def sample_from_model(
    model,
    tokenizer,
    n: int,
    seqlen: int,
    seed: int,
    batch_size: int = 16,
    temperature: float = 1.0,
    device=None,
    progress=False,
) -> torch.Tensor:
    """n sequences of seqlen tokens sampled from the model (seeded; start at BOS; temperature 1,
    no top-k/top-p; EOS is an ordinary token, so every sequence has exactly seqlen tokens and
    the samples follow the model's own distribution over length-seqlen strings)."""
    import inspect

    from trimprune.core.model import model_device

    dev = torch.device(device) if device is not None else model_device(model)
    cache_kw = (
        "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    )
    bos = bos_token_id(model, tokenizer)
    gen = torch.Generator(device=dev).manual_seed(seed)
    seqs = []
    bar = Progress.of(progress).bar(total=n * (seqlen - 1), desc="sampling", unit="tok")
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        ids = torch.full((b, 1), bos, dtype=torch.long, device=dev)
        out = model(input_ids=ids, use_cache=True)
        if nonfinite({"logits": extrema(out.logits)}):  # one host read per batch
            raise blame(
                model,
                "sampling from the model ({calib} self / --eval self): its logits are not finite",
            )
        past = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        toks = [ids]
        for _ in range(seqlen - 1):
            logits = out.logits[:, -1, :].float()
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=gen)
            toks.append(nxt)
            out = model(input_ids=nxt, use_cache=True, **{cache_kw: past})
            past = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
            bar.update(b)
        seqs.append(torch.cat(toks, 1).cpu())
    bar.close()
    return torch.cat(seqs, 0)


def get_calibration(config: CalibConfig, tokenizer, model=None, progress=False) -> torch.Tensor:
    """(nsamples, seqlen) token ids for the calibration source named by the config."""
    return load_calibration(config, tokenizer, model, progress)[0]


def load_calibration(
    config: CalibConfig, tokenizer, model=None, progress=False
) -> tuple[torch.Tensor, CalibrationData]:
    """`get_calibration`'s token ids and the record of where they came from (`CalibrationData`:
    the file actually read, with its size and SHA-256, and the protocol's numbers)."""
    name = config.source
    record = CalibrationData(name, config.nsamples, config.seqlen, config.seed)
    if name == "self":
        if model is None:
            raise TrimpruneError("{calib} self needs the model to sample from")
        return sample_from_model(
            model,
            tokenizer,
            config.nsamples,
            config.seqlen,
            config.seed,
            batch_size=max(1, min(config.nsamples, 32)),
            progress=progress,
        ), record
    rows, path = dataset_source(name, "train", config.data, config.format, "{calib_data}")
    record = CalibrationData(
        name,
        config.nsamples,
        config.seqlen,
        config.seed,
        (DataFile.of(path),) if path is not None else (),
        None if path is not None else hub_name(name, "train"),
    )
    if name == "c4":
        ids = calib_c4(tokenizer, rows, config.nsamples, config.seqlen, config.seed)
    else:
        ids = calib_stream(tokenizer, " ".join(rows), config.nsamples, config.seqlen, config.seed)
    return ids, record


# ------------------------------------------------------------------------------ evaluation text
def eval_text(name: str, path: str | None = None, fmt: str | None = None) -> tuple[str, int | None]:
    """(text, token cap) of an evaluation set under its paper protocol:
    wikitext2 test rows joined with "\\n\\n"; ptb test sentences joined with " ";
    c4 the first 1100 validation documents joined with " ", capped at 256 windows;
    any other NAME=PATH: the file's rows joined with "\\n\\n"."""
    text, cap, _ = eval_source(name, path, fmt)
    return text, cap


def eval_source(
    name: str, path: str | None = None, fmt: str | None = None
) -> tuple[str, int | None, str | None]:
    """`eval_text`'s (text, token cap) and the local file read (None: the rows came from the
    Hub)."""
    flag = f"--eval-data {name}=PATH"
    if name == "wikitext2":
        rows, used = dataset_source("wikitext2", "test", path, fmt, flag)
        return EVAL_JOIN[name].join(rows), None, used
    if name == "ptb":
        rows, used = dataset_source("ptb", "test", path, fmt, flag)
        return EVAL_JOIN[name].join(rows), None, used
    if name == "c4":
        rows, used = dataset_source("c4", "validation", path, fmt, flag)
        return EVAL_JOIN[name].join(rows[:C4_EVAL_DOCUMENTS]), C4_EVAL_WINDOWS, used
    if path is None:
        raise TrimpruneError(
            f"--eval {name} is not a known dataset: use wikitext2, c4, ptb or self, or give "
            f"--eval-data {name}=PATH"
        )
    return "\n\n".join(read_rows(path, fmt, flag=f"--eval-data {name}")), None, path


EVAL_JOIN = {"wikitext2": "\n\n", "ptb": " ", "c4": " "}  # how an evaluation set's rows are joined
C4_EVAL_DOCUMENTS = 1100  # the C4 validation documents of the perplexity protocol
C4_EVAL_WINDOWS = 256  # and its cap on windows
