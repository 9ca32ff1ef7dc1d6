"""qk-attn: record the real query and key vectors of a transformers model while it runs.

`import qk_attn` registers the attention implementation "qk_sniff" (and its mask) in
transformers' registries; that is its only side effect.
"""

from qk_attn.errors import ConfigError

try:
    _registering = False  # (an import that failed before it, a missing pyarrow, leaves "qk_sniff" unregistered)
    from qk_attn.capture.hooks import register, wrap_flash_attention
    from qk_attn.session import Session, flush, reload_env, session

    _registering = True
    register()
except ConfigError:  # a bad QK_SNIFF_* value: the user's to fix, whatever transformers is
    raise
except Exception as error:  # a transformers release that moved or changed what qk-attn uses (or another error)
    from qk_attn.capture.facts import mismatch_at_import

    raise mismatch_at_import(error, registered=_registering) from error
from qk_attn.config import SniffConfig
from qk_attn.dataset.load import load, load_examples, load_vectors
from qk_attn.sampler import Sampler
from qk_attn.version import __version__

__all__ = [
    "ConfigError",
    "Sampler",
    "Session",
    "SniffConfig",
    "flush",
    "load",
    "load_examples",
    "load_vectors",
    "register",
    "reload_env",
    "session",
    "wrap_flash_attention",
    "__version__",
]
