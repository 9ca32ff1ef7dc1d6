"""qk-attn: record the real query and key vectors of a transformers model while it runs.

`import qk_attn` registers the attention implementation "qk_sniff" (and its mask).
"""

from .config import ConfigError, SniffConfig
from .sampler import Sampler

__version__ = "0.1.0"

__all__ = ["ConfigError", "Sampler", "SniffConfig", "__version__"]
