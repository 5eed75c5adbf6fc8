"""The errors fthss raises for what a user gave it: a bad file, option, folder or model.

Every one derives from `FthssError` (itself a `ValueError`, as they all were before it), and its
message names the file, record, field or option at fault. The command line catches
`FthssError` (exit 2) and `OSError` (exit 1) at the command boundary and prints one line;
anything else is a bug in fthss and keeps its traceback.

The loaders' own classes (`ChainFormatError`, `CorpusFormatError`, `StageLoadError`,
`CheckpointError`, `UnsupportedModelError`) live beside their loaders and derive from it too.
"""

from __future__ import annotations


class FthssError(ValueError):
    """Something the user gave fthss cannot be used; the message says what and where."""


class ConfigError(FthssError):
    """An option or setting out of its range, or settings that contradict each other."""


class EmptyDataError(FthssError):
    """Nothing left to work on: no records, every record skipped, or none the method uses."""


class OutputExistsError(FthssError):
    """An output that would overwrite something fthss was not asked to overwrite."""


def differences(theirs: dict, ours: dict) -> dict[str, str]:
    """The keys whose values differ between a saved record (`theirs`: a checkpoint's settings,
    a base's world) and this run's (`ours`), in key order, each described for a message as
    "key: <theirs> there, <ours> here"."""
    return {k: f"{k}: {theirs.get(k)!r} there, {ours.get(k)!r} here"
            for k in sorted(theirs.keys() | ours.keys()) if theirs.get(k) != ours.get(k)}


class MissingDependencyError(FthssError):
    """An optional package a command needs is not installed; the message names the extra."""


class SequenceTooLongError(FthssError):
    """A sequence that needs more positions than allowed (`--max-length` or the base's)."""


class ModelLoadError(FthssError):
    """A base model folder that cannot be loaded: a broken config, truncated weights, ..."""


class NonFiniteError(FthssError):
    """Training met a NaN or inf loss, gradient or parameter; nothing after it was saved."""


class RunLockedError(FthssError):
    """Another process holds the output folder of a training run."""
