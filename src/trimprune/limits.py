"""Hard limits on inputs, checked before anything expensive: the size and nesting depth of the YAML
and JSON files trimprune reads (checked before parsing; YAML anchors and aliases are refused), and
the ranges of counts and integers (`check_count`). Each violation is one line (`TrimpruneError`).

docs/validation.md lists the limits."""

from __future__ import annotations

from pathlib import Path

import yaml

from trimprune.errors import ConfigError, InputFileError

MAX_FILE_BYTES = 1 << 20  # a recipe or an allocation file
MAX_DEPTH = 32  # nesting of lists and mappings in a recipe or an allocation file
MAX_COUNT = 1_000_000  # --nsamples, batch sizes, --self-eval-samples
MAX_LIMIT = 1_000_000_000  # --eval-limit, --tasks-limit
MAX_SEQLEN = 1 << 20  # --seqlen, --eval-seqlen (tokens)
MAX_SEED = 2**63 - 1  # --seed, --search-seed (torch takes 64-bit seeds)


def check_count(flag: str, value, lo: int, hi: int, hint: str = "") -> None:
    """`value` is an integer in [lo, hi], else one line naming `flag`."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise ConfigError(
            f"{flag} {shown} is outside [{lo:,}, {hi:,}]: give an integer in that range{hint}"
        )


def read_limited(path: str | Path, where: str) -> str:
    """The UTF-8 text of a small input file (a recipe, an allocation file): at most
    `MAX_FILE_BYTES`, checked before it is read."""
    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as e:
        raise InputFileError(f"{where} cannot be read ({e.strerror or e})") from e
    if size > MAX_FILE_BYTES:
        raise InputFileError(
            f"{where} is {size:,} bytes, above the limit of {MAX_FILE_BYTES:,} (1 MB) for this "
            "file: give a smaller file"
        )
    try:
        with open(p, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise InputFileError(f"{where} cannot be read ({e.strerror or e})") from e
    if len(data) > MAX_FILE_BYTES:
        raise InputFileError(f"{where} is above the limit of {MAX_FILE_BYTES:,} bytes (1 MB)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise InputFileError(f"{where} is not UTF-8 text: give a JSON or YAML file") from None


def nesting_depth(text: str) -> int:
    """An upper bound of the nesting depth of YAML or JSON `text`, without parsing it: flow
    brackets ([ {) open outside quotes, plus the block levels (indentation steps and `- ` items
    on one line). Stops counting once above `MAX_DEPTH`."""
    deepest, flow, indents = 0, 0, [-1]
    for line in text.splitlines():
        body = line.lstrip(" ")
        if flow == 0:
            if not body or body.startswith("#"):
                continue
            indent = len(line) - len(body)
            while indents and indent <= indents[-1]:
                indents.pop()
            indents.append(indent)
            dashes = 0
            while body.startswith(("- ", "-\t")) or body == "-":
                dashes += 1
                body = body[1:].lstrip(" \t")
        else:
            dashes = 0
        quote = ""
        for ch in body:
            if quote:
                if ch == quote:
                    quote = ""
            elif ch in "\"'":
                quote = ch
            elif ch == "#":
                break
            elif ch in "[{":
                flow += 1
                deepest = max(deepest, len(indents) + dashes + flow)
            elif ch in "]}":
                flow = max(0, flow - 1)
        deepest = max(deepest, len(indents) + dashes)
        if deepest > MAX_DEPTH:
            break
    return deepest


def check_depth(text: str, where: str) -> None:
    if nesting_depth(text) > MAX_DEPTH:
        raise InputFileError(
            f"{where} nests lists or mappings deeper than {MAX_DEPTH} levels: give a flat file"
        )


class _NoAliasLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses anchors and aliases (`&a`, `*a`): a few hundred bytes of
    aliases can expand to billions of nodes."""

    where = "the YAML file"

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise InputFileError(
                f"{self.where} uses a YAML anchor or alias (&name / *name) at line "
                f"{event.start_mark.line + 1}: these are not allowed; write the values out"
            )
        return super().compose_node(parent, index)


def load_yaml(text: str, where: str):
    """`yaml.safe_load(text)` within the limits: at most `MAX_FILE_BYTES`, nesting at most
    `MAX_DEPTH` (checked before parsing), no anchors or aliases."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_FILE_BYTES:
        raise InputFileError(f"{where} is above the limit of {MAX_FILE_BYTES:,} bytes (1 MB)")
    check_depth(text, where)
    loader = _NoAliasLoader(text)
    loader.where = where
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
