"""Numbers in a run configuration: a value written as text is plain ASCII digits, as the
environment's are (qk_attn.config); int() and float() would also take "1_0", "+4" and other
scripts' digits."""

from __future__ import annotations

import pytest

from qk_attn.errors import ConfigError
from qk_attn.run.config import RunConfig

MINIMAL = {"dataset": {"path": "docs.jsonl"}, "model": {"name": "some/model"}, "output": {"data_root": "out"}}
INT_KEYS = [
    "dataset.max_samples",
    "tokenizer.max_length",
    "inference.batch_size",
    "inference.pinned_mb",
    "capture.min_bucket_size",
    "capture.seed",
]
# Quoted, so YAML hands them over as text: YAML 1.1 itself reads an unquoted 1_0 or +4 as an int.
ODD_FORMS = ["'1_0'", "'+4'", "'\u0663'", "'\uff14'", "' \u0664 '", "'4.0'", "'0x10'"]


@pytest.mark.parametrize("key", INT_KEYS)
@pytest.mark.parametrize("form", ODD_FORMS)
def test_an_integer_in_another_form_is_refused_in_one_line_naming_the_key(key, form):
    with pytest.raises(ConfigError, match=rf"^{key.replace('.', '[.]')}=.* is invalid: expected an integer") as error:
        RunConfig.load(None, [f"{key}={form}"], base=MINIMAL)
    message = str(error.value)
    assert "\n" not in message and "plain ASCII digits, e.g. 8" in message


@pytest.mark.parametrize("form", ODD_FORMS[:5] + ["'1_0.5'", "'+2.5'", "'infinity'"])
def test_a_number_in_another_form_is_refused_in_one_line_naming_the_key(form):
    with pytest.raises(ConfigError, match=r"^capture[.]max_gb=.* is invalid: expected a finite number > 0") as error:
        RunConfig.load(None, [f"capture.max_gb={form}"], base=MINIMAL)
    assert "\n" not in str(error.value) and "plain ASCII decimal, e.g. 2.5" in str(error.value)


def test_plain_numbers_pass_as_text_or_as_yaml_numbers():
    for form in ("8", "'8'", "' 8 '", '"8"'):
        loaded = RunConfig.load(None, [f"{key}={form}" for key in INT_KEYS], base=MINIMAL)
        assert (loaded.dataset.max_samples, loaded.tokenizer.max_length, loaded.inference.batch_size) == (8, 8, 8)
        assert (loaded.inference.pinned_mb, loaded.capture.min_bucket_size, loaded.capture.seed) == (8, 8, 8)
    for form, gb in (("2.5", 2.5), ("'2.5'", 2.5), ("'1e3'", 1000.0), ("'.5'", 0.5), ("3", 3.0)):
        assert RunConfig.load(None, [f"capture.max_gb={form}"], base=MINIMAL).capture.max_gb == gb
    # The range is still checked after the form, with its own message.
    with pytest.raises(ConfigError, match=r"^capture[.]seed='-1' is invalid: expected an integer >= 0$"):
        RunConfig.load(None, ["capture.seed='-1'"], base=MINIMAL)


@pytest.mark.parametrize("form", ["1_0", "+4", "0x10", "0b11", "1:30"])
def test_an_unquoted_yaml_number_in_another_form_is_refused_too(tmp_path, form):
    """YAML 1.1 reads these as 10, 4, 16, 3 and 90 (base 60) before the sections see them: the run's
    YAML reader keeps them as text, refused as the quoted forms are, from a file and from --set."""
    with pytest.raises(ConfigError, match=r"^inference[.]batch_size=.* is invalid: expected an integer"):
        RunConfig.load(None, [f"inference.batch_size={form}"], base=MINIMAL)
    config = tmp_path / "run.yaml"
    config.write_text(
        f"dataset: {{path: docs.jsonl}}\nmodel: {{name: some/model}}\noutput: {{data_root: out}}\n"
        f"inference:\n  batch_size: {form}\n"
    )
    with pytest.raises(ConfigError, match=r"^inference[.]batch_size=.* is invalid: expected an integer"):
        RunConfig.load(config, [])


def test_a_leading_zero_is_decimal_not_octal():
    assert RunConfig.load(None, ["inference.batch_size=010"], base=MINIMAL).inference.batch_size == 10
