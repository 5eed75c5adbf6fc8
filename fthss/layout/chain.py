"""Chain samples: shared content, then steps, each run by a named stage.

A chain sample is text. It is what a user writes (our JSONL format), what the authors' data
holds (`I_ALL`, `I_A`, `O_A`, `O_B`, multi-round `O_1A`, `O_1B`, `O_2A`, ...), and what the
engine runs (outputs left empty, per-step generation limits set). `fthss.layout.sequence`
turns it into tokens and metadata.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fthss.datafiles import (
    OnBad,
    check_record,
    is_valid_unicode,
    json_document,
    jsonl_records,
    parse_each,
)
from fthss.errors import FthssError
from fthss.ranges import COUNT, NON_NEGATIVE, TOKEN_ID


class ChainFormatError(FthssError):
    """A chain file or record that cannot be read; the message names the file, line and field."""


MAX_STAGE_NAME_BYTES = 64
STAGE_NAME_RULE = f"letters, digits, '-' and '_', at most {MAX_STAGE_NAME_BYTES} bytes as UTF-8"


def is_stage_name(name: str) -> bool:
    """Letters, digits, '-' and '_', at most MAX_STAGE_NAME_BYTES. A stage's name is also a
    folder name (`fthss train` saves stage S to OUT/S), so a name read from a data file can
    never lead out of that folder, nor past the 255 bytes a file name may have."""
    return (isinstance(name, str) and name.replace("_", "").replace("-", "").isalnum()
            and is_valid_unicode(name) and len(name.encode("utf-8")) <= MAX_STAGE_NAME_BYTES)


def phase_folder(names: list[str]) -> str:
    """The folder name of a training phase over the stages `names`: `train-A+B`, or, when that
    would be too long for a file name, its first 64 bytes and a hash of the whole (`~` is in no
    stage name, so a shortened name never equals a whole one)."""
    joined = "+".join(names)
    if len(joined.encode("utf-8")) <= 2 * MAX_STAGE_NAME_BYTES:
        return f"train-{joined}"
    digest = hashlib.sha256(joined.encode("utf-8")).hexdigest()[:16]
    return f"train-{joined.encode('utf-8')[:64].decode('utf-8', 'ignore')}~{digest}"


@dataclass
class Step:
    stage: str
    input: str | None = None  # private to this step unless `input_visible`
    output: str | None = None  # gold text for training; None when the engine generates it
    input_visible: bool = False  # later steps may read this input
    max_new_tokens: int | None = None  # generation limit (engine default when None)
    stop: list[str] = field(default_factory=list)  # stop strings for generation
    stop_token_ids: list[int] = field(default_factory=list)  # stop tokens besides EOS
    min_new_tokens: int = 0  # EOS and stop tokens are not chosen before this many (benchmarks)


@dataclass
class ChainSample:
    shared: str
    steps: list[Step]
    id: str | None = None
    # where it was read from (`file:line`, `file: record i`), for errors about it later; not
    # part of the format, and two samples differing only here are equal
    source: str | None = field(default=None, compare=False, repr=False)

    @property
    def stages(self) -> list[str]:
        return list(dict.fromkeys(step.stage for step in self.steps))

    def to_json(self) -> dict:
        record = asdict(self)
        del record["source"]
        return record


_STEP_FIELDS = {"stage": str, "input": (str, type(None)), "output": (str, type(None)),
                "input_visible": bool, "max_new_tokens": (int, type(None)), "stop": list,
                "stop_token_ids": list, "min_new_tokens": int}
_OUTPUT_KEY = re.compile(r"^O_(\d*)([A-Za-z]\w*)$")
_INPUT_KEY = re.compile(r"^I_([A-Za-z]\w*)$")


def chain_from_json(record: dict, where: str) -> ChainSample:
    """Our JSONL format: `{"id", "shared", "steps": [{"stage", "input", "output", ...}]}`."""
    if not isinstance(record, dict):
        raise ChainFormatError(f"{where}: expected a JSON object, got {type(record).__name__}")
    unknown = set(record) - {"id", "shared", "steps"}
    if unknown:
        raise ChainFormatError(f"{where}: unknown field(s) {sorted(unknown)}")
    shared = record.get("shared", "")
    if not isinstance(shared, str):
        raise ChainFormatError(f"{where}: field 'shared' must be a string")
    chain_id = record.get("id")
    if chain_id is not None and (isinstance(chain_id, bool)
                                 or not isinstance(chain_id, (str, int))):
        raise ChainFormatError(f"{where}: field 'id' must be a string or an integer")
    steps = record.get("steps")
    if not isinstance(steps, list) or not steps:
        raise ChainFormatError(f"{where}: field 'steps' must be a non-empty list")
    parsed = []
    for k, step in enumerate(steps):
        at = f"{where}: steps[{k}]"
        if not isinstance(step, dict):
            raise ChainFormatError(f"{at}: expected an object")
        if "stage" not in step:
            raise ChainFormatError(f"{at}: missing field 'stage'")
        for name, value in step.items():
            if name not in _STEP_FIELDS:
                raise ChainFormatError(f"{at}: unknown field '{name}'")
            # bool is an int to isinstance; `true` is no token count or token id
            if not isinstance(value, _STEP_FIELDS[name]) or (
                    isinstance(value, bool) and _STEP_FIELDS[name] is not bool):
                raise ChainFormatError(f"{at}.{name}: wrong type {type(value).__name__}")
        if not is_stage_name(step["stage"]):
            raise ChainFormatError(f"{at}.stage: {step['stage']!r:.80} is not a stage name "
                                   f"({STAGE_NAME_RULE})")
        if step.get("output") is not None and not step["output"].strip():
            raise ChainFormatError(f"{at}.output: empty; leave it out (or null) for the engine "
                                   "to generate it")
        if step.get("max_new_tokens") is not None:
            # the engine generates at least one token per step and reads 0 as "no limit set"
            COUNT.check(step["max_new_tokens"], f"{at}.max_new_tokens", ChainFormatError)
        NON_NEGATIVE.check(step.get("min_new_tokens", 0), f"{at}.min_new_tokens", ChainFormatError)
        if not all(isinstance(s, str) and s for s in step.get("stop", [])):
            raise ChainFormatError(f"{at}.stop: must be a list of non-empty strings")
        for j, token in enumerate(step.get("stop_token_ids", [])):
            # the vocabulary's size is checked where the model is known (`check_request`)
            TOKEN_ID.check(token, f"{at}.stop_token_ids[{j}]", ChainFormatError)
        parsed.append(Step(**step))
    return ChainSample(shared=shared, steps=parsed, id=None if chain_id is None else str(chain_id),
                       source=where)


def chain_from_authors(record: dict, where: str) -> ChainSample:
    """The FTHSS authors' keys: `I_ALL` shared, `I_<stage>` a stage's input, `O_<stage>` or
    `O_<round><stage>` outputs. Single-round steps run in stage-name order (A then B);
    multi-round steps in (round, stage) order. An input belongs to the stage's first step."""
    if not isinstance(record, dict):
        raise ChainFormatError(f"{where}: expected a JSON object, got {type(record).__name__}")
    check_record(record, where, ChainFormatError)  # a JSONL line was checked as it was read
    outputs, inputs = [], {}
    for key, value in record.items():
        if key == "I_ALL":
            continue
        if not isinstance(value, str):
            raise ChainFormatError(f"{where}: field '{key}' must be a string")
        if m := _OUTPUT_KEY.fullmatch(key):
            if not is_stage_name(m.group(2)):
                raise ChainFormatError(f"{where}: field '{key:.80}': {m.group(2)!r:.80} is not a "
                                       f"stage name ({STAGE_NAME_RULE})")
            if not value.strip():
                raise ChainFormatError(f"{where}: field '{key}' is empty")
            outputs.append((int(m.group(1)) if m.group(1) else None, m.group(2), value, key))
        elif m := _INPUT_KEY.fullmatch(key):
            inputs[m.group(1)] = value
        else:
            raise ChainFormatError(f"{where}: unknown field '{key}' (expected I_ALL, I_<stage>, "
                                   "O_<stage> or O_<round><stage>)")
    if not outputs:
        raise ChainFormatError(f"{where}: no output field (O_A, O_1A, ...)")
    shared = record.get("I_ALL", "")
    if not isinstance(shared, str):
        raise ChainFormatError(f"{where}: field 'I_ALL' must be a string")
    orphan = set(inputs) - {stage for _, stage, _, _ in outputs}
    if orphan:
        raise ChainFormatError(f"{where}: input for stage(s) {sorted(orphan)} with no output")
    if any(o[0] is not None for o in outputs):
        _check_rounds(outputs, where)
    steps = []
    for _, stage, text, _ in sorted(outputs, key=lambda o: (o[0] or 0, o[1])):
        steps.append(Step(stage=stage, input=inputs.pop(stage, None), output=text))
    return ChainSample(shared=shared, steps=steps, source=where)


def _check_rounds(outputs: list[tuple[int | None, str, str, str]], where: str) -> None:
    """Multi-round keys must be read one way only: no `O_A` beside `O_1A`, no round given
    twice (`O_1A` beside `O_01A`), rounds from 1 without a gap, each complete (every stage of
    the record, in name order) but the last, which may stop after any stage (`O_3A` needs
    `O_2B`). Anything else would run as extra or reordered steps."""
    plain = [key for r, _, _, key in outputs if r is None]
    if plain:
        raise ChainFormatError(f"{where}: field '{plain[0]}' has no round, beside fields with "
                               "one (O_1A, ...): use one form for every output")
    seen: dict[tuple[int, str], str] = {}
    for r, stage, _, key in outputs:
        if r < 1:
            raise ChainFormatError(f"{where}: field '{key}': rounds count from 1")
        if (r, stage) in seen:
            raise ChainFormatError(f"{where}: fields '{seen[r, stage]}' and '{key}' are both "
                                   f"round {r} of stage {stage}")
        seen[r, stage] = key
    stages = sorted({stage for _, stage in seen})
    last = max(r for r, _ in seen)
    expected = [(r, s) for r in range(1, last + 1) for s in stages]
    present = sorted(seen)
    if present != expected[: len(present)]:  # the record must hold a prefix of these
        missing = next(p for p in expected if p not in seen)
        raise ChainFormatError(f"{where}: no field for round {missing[0]} of stage {missing[1]} "
                               f"(O_{missing[0]}{missing[1]}), though later rounds have one")


def check_request(sample: ChainSample, vocab_size: int, where: str) -> None:
    """What a file's format cannot know but a model can: every stop token id within the
    vocabulary of `vocab_size` tokens. And what Python-made requests were never checked for:
    text that is valid Unicode. Raises ChainFormatError naming `where` and the field."""
    check_record(sample.to_json(), where, ChainFormatError)
    for k, step in enumerate(sample.steps):
        for j, token in enumerate(step.stop_token_ids):
            if not 0 <= token < vocab_size:
                raise ChainFormatError(f"{where}: steps[{k}].stop_token_ids[{j}]: {token} is not a "
                                       f"token id of this model (its vocabulary has {vocab_size})")


def load_chains(path: str | Path, on_bad: OnBad | None = None) -> list[ChainSample]:
    """Read a `.jsonl` file in our format, or a `.json` list in the authors' format. A bad
    record raises ChainFormatError, or goes to `on_bad` and is skipped (`fthss.datafiles`)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        return parse_each(jsonl_records(path, ChainFormatError, on_bad), chain_from_json,
                          ChainFormatError, on_bad)
    records = json_document(path, ChainFormatError)
    if not isinstance(records, list):
        raise ChainFormatError(f"{path}: expected a JSON list of records")
    return parse_each(((f"{path}: record {i}", (i, r)) for i, r in enumerate(records)),
                      lambda item, where: _with_id(chain_from_authors(item[1], where), item[0]),
                      ChainFormatError, on_bad)


def _with_id(sample: ChainSample, index: int) -> ChainSample:
    """The authors' records carry no id: the record's index in its file is a stable one (it
    does not change when other records are skipped), so results can be matched to records."""
    sample.id = str(index)
    return sample
