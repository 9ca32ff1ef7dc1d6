"""Every error type of qk-attn, and the `qk-sniff` exit status of each (`EXIT_STATUS`).

A leaf: it imports nothing from the package, so any layer may raise these. An expected
error's message is the whole story (the setting or file, the reason, the fix); the CLI prints
it as one line on stderr, `--debug` adds the traceback.
"""

from __future__ import annotations

from typing import Any


def one_line(error: BaseException) -> str:
    """An error's message as one line (whitespace runs become one space), else its type's name."""
    return " ".join(str(error).split()) or type(error).__name__


# ---- settings ---------------------------------------------------------------------------------
class ConfigError(ValueError):
    """A setting has a value outside what is allowed.

    Errors about one `SniffConfig` field carry `setting` (the field name), `value` and
    `allowed`, so a caller that knows where the value came from can name it that way
    (`relabel`); other messages are free text.
    """

    def __init__(self, message: str, *, setting: str | None = None, value: Any = None, allowed: str | None = None):
        super().__init__(message)
        self.setting, self.value, self.allowed = setting, value, allowed

    def relabel(self, label: str) -> ConfigError:
        """The same error, naming the setting `label` (e.g. `QK_SNIFF_LAYERS`, `capture.layers`)."""
        if self.setting is None:
            return ConfigError(f"{label}: {self}")
        return ConfigError(
            f"{label}={self.value!r} is invalid: expected {self.allowed}",
            setting=self.setting,
            value=self.value,
            allowed=self.allowed,
        )


class DemoUnavailable(RuntimeError):
    """A package the demo needs is not installed; the message says which command installs it."""


# ---- capture: inside the attention call --------------------------------------------------------
class CaptureError(RuntimeError):
    """A forward qk_sniff cannot record exactly; raised instead of writing wrong rows."""


class CaptureOverflow(RuntimeError):
    """More tokens were selected in one attention call than its staging capacity holds."""


class MisnumberedPositions(CaptureError):
    """The positions RoPE used do not count up by one along an example, or leave [0, 2**31) (packed documents restart
    them, right padding in generate() repeats them, position_ids that change between a sequence's
    forwards skip some; the int32 position column ends at 2**31 - 1): refused, since rows are keyed by
    position and an example's positions are the range [first_position, first_position + valid_length).
    One example whose positions leave that range is told of the range, not of packing or padding (`out_of_range`)."""

    @classmethod
    def of(cls, example_ids: list[int], seen: str = "") -> MisnumberedPositions:
        """`seen`: what the first of them looks like, where the host knows it."""
        return cls(
            f"qk_sniff: examples {example_ids}: the positions RoPE used do not count up by one from token to "
            f"token, or leave 0 to 2**31 - 1{f' ({seen})' if seen else ''}; packed documents restart them, right "
            "padding in generate() repeats them, position_ids that change between a sequence's forwards skip some; "
            "rows could not be keyed by position, so nothing of them is recorded; run one document per batch row, "
            "left-padded, with the same position_ids scheme in every forward"
        )

    @classmethod
    def out_of_range(cls, example: Any, first: int, last: int) -> MisnumberedPositions:
        """Example `example` is at positions `first` to `last`, of which some lie outside the int32 position
        column (below 0, or from 2**31 on): told of that range, not of packing or padding."""
        where = (
            "below 0, where the position column and the sampler's buckets start"
            if first < 0
            else "beyond the int32 position column's 2**31 - 1"
        )
        return cls(
            f"qk_sniff: examples [{example}]: example {example} is at positions {first} to {last}, {where}; rows "
            "are keyed by position, which that column cannot hold, so nothing of it is recorded; give it "
            "position_ids from 0 to 2**31 - 1 (a document's tokens count from 0, as transformers numbers them "
            "without position_ids)"
        )


class TransformersMismatch(RuntimeError):
    """The installed transformers breaks facts qk-attn relies on."""


# ---- storage: an output folder -----------------------------------------------------------------
class OutputLocked(RuntimeError):
    """Another capture holds the output folder's lock."""


class StorageError(ValueError):
    """An expected storage failure (damaged or foreign files, misuse): a one-line message that
    names the file and the fix; a CLI prints it without a traceback."""


class ManifestError(StorageError):
    """qk_sniff.json is unreadable or invalid (one line; says how to recover without losing rows)."""


class DamagedDataset(StorageError):
    """Committed shards are missing or have the wrong size: resuming would keep them so."""


class CorruptShard(StorageError):
    """A committed shard fails its size, digest or page checksums (the message names the file)."""


class NotACapture(StorageError):
    """The output folder holds files that no capture wrote; nothing there is touched."""


class CommittedExampleError(StorageError):
    """Rows arrived for an example that is already committed (a rerun of it, or reused ids)."""


class SaverError(RuntimeError):
    """The saver thread failed; raised in the capturing thread at its next call."""


# ---- dataset: a finished folder on the Hub -----------------------------------------------------
class Terminated(KeyboardInterrupt):
    """SIGTERM to `qk-sniff` (a batch scheduler's time limit, torchrun stopping a rank): handled as Ctrl-C
    is, so that examples in flight are dropped, committed ones kept, and the folder closed cleanly."""


class HubError(RuntimeError):
    """A Hub operation failed; the message includes what the Hub said."""


# ---- exit status -------------------------------------------------------------------------------
# (error type, `qk-sniff` exit status, whether the line ends with "--debug shows the traceback").
# The first entry the error is an instance of wins, so subclasses come before their bases.
# Status None: a bug or an unsupported installation, not a user's mistake; the traceback is kept
# (Python exits 1), as it is for any error not listed here. 130 (interrupted) is the CLI's own.
EXIT_STATUS: tuple[tuple[type[BaseException], int | None, bool], ...] = (
    (ConfigError, 2, False),
    (DemoUnavailable, 2, False),
    (CaptureError, 2, False),  # a refusal: nothing of the refused documents was committed
    (StorageError, 2, False),  # ManifestError, DamagedDataset, CorruptShard, NotACapture, CommittedExampleError
    (FileNotFoundError, 2, False),
    (OutputLocked, 2, True),
    (SaverError, 2, True),
    (HubError, 1, False),
    (CaptureOverflow, None, False),
    (TransformersMismatch, None, False),
    (OSError, 2, True),  # a full or unwritable disk, a folder that is not a capture, ...
    (ValueError, 2, True),
)
