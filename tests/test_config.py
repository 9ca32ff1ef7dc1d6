"""Every QK_SNIFF_* variable: parsed when read, bad values rejected with a clear message."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from qk_attn import SniffConfig
from qk_attn.config import main_module
from qk_attn.run.sections import validate
from qk_attn.setting_values import parse_index_list


def test_defaults_and_full_environment():
    env = {
        "QK_SNIFF_OUTPUT": "/tmp/x",
        "QK_SNIFF_SAMPLER": "uniform",
        "QK_SNIFF_MIN_BUCKET_SIZE": "8192",
        "QK_SNIFF_BASE_RATE": "1.5",
        "QK_SNIFF_SEED": "7",
        "QK_SNIFF_LAYERS": "0,3,10-12",
        "QK_SNIFF_HEADS": "1,2",
        "QK_SNIFF_KEY_HEADS": "0",
        "QK_SNIFF_CAPTURE": "k",
        "QK_SNIFF_ROPE": "pre",
        "QK_SNIFF_FULL_ATTENTION_ONLY": "1",
        "QK_SNIFF_BACKEND": "eager",
        "QK_SNIFF_HEAD_SAMPLE_COUNT": "5",
        "QK_SNIFF_HEAD_SAMPLE_SEED": "3",
        "QK_SNIFF_VECTOR_DTYPE": "float16",
        "QK_SNIFF_PINNED_MB": "64",
    }
    config = SniffConfig.from_env(env)
    assert config == SniffConfig(
        output="/tmp/x",
        sampler="uniform",
        min_bucket_size=8192,
        base_rate=1.5,
        seed=7,
        layers=(0, 3, 10, 11, 12),
        heads=(1, 2),
        key_heads=(0,),
        capture="k",
        rope="pre",
        full_attention_only=True,
        backend="eager",
        head_sample_count=5,
        head_sample_seed=3,
        vector_dtype="float16",
        pinned_mb=64,
    )
    assert SniffConfig.from_env({}) == SniffConfig()
    assert SniffConfig.from_env({"QK_SNIFF_SEED": "1"}, seed=2).seed == 2  # keywords win


@pytest.mark.parametrize(
    "name,value,allowed",
    [
        ("SAMPLER", "gauss", "log_uniform | uniform | all"),
        ("MIN_BUCKET_SIZE", "100", "power of two"),
        ("MIN_BUCKET_SIZE", "abc", "power of two"),
        ("BASE_RATE", "0", "> 0"),
        ("BASE_RATE", "many", "number"),
        ("SEED", "-1", ">= 0"),
        ("LAYERS", "0,x", "comma-separated"),
        ("LAYERS", "5-2", "comma-separated"),
        ("HEADS", "-3", "non-negative"),
        ("KEY_HEADS", "a-b", "comma-separated"),
        ("CAPTURE", "v", "q,k | q | k"),
        ("ROPE", "middle", "post | pre"),
        ("FULL_ATTENTION_ONLY", "maybe", "0 or 1"),
        ("BACKEND", "flex", "sdpa | eager; flash attention is recorded under its own name"),
        ("HEAD_SAMPLE_COUNT", "0", ">= 1"),
        ("VECTOR_DTYPE", "bfloat16", "float32 | float16"),
        ("PINNED_MB", "0", ">= 1"),
    ],
)
def test_bad_value_names_variable_value_and_allowed(name, value, allowed):
    with pytest.raises(ValueError) as err:
        SniffConfig.from_env({f"QK_SNIFF_{name}": value})
    message = str(err.value)
    assert f"QK_SNIFF_{name}={value!r}" in message and allowed in message


def test_keyword_values_are_named_as_keywords_and_env_values_as_variables():
    with pytest.raises(ValueError, match=r"^layers='x' is invalid: expected comma-separated") as error:
        SniffConfig(layers="x")
    assert "QK_SNIFF" not in str(error.value)
    with pytest.raises(ValueError, match=r"^base_rate=0 is invalid"):
        SniffConfig.from_env({"QK_SNIFF_BASE_RATE": "0"}, base_rate=0)  # the keyword won: name the keyword
    with pytest.raises(ValueError, match=r"^QK_SNIFF_BASE_RATE='0' is invalid"):
        SniffConfig.from_env({"QK_SNIFF_BASE_RATE": "0"}, seed=1)  # the environment's value failed
    with pytest.raises(ValueError, match=r"^sampler='x' is invalid"):
        import qk_attn

        with qk_attn.session(sampler="x"):
            pass


def test_bad_environment_fails_at_import_not_in_a_forward(tmp_path):
    """As qk_attn.ConfigError (a ValueError), not as a transformers mismatch: the registration it stopped
    made the facts check blame transformers ("install a transformers version qk-attn supports")."""
    env = {"QK_SNIFF_SAMPLER": "nope", "PATH": "/usr/bin:/bin"}
    script = "try:\n import qk_attn\nexcept ValueError as e:\n print(type(e).__name__, e)"
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert result.stdout.startswith("ConfigError QK_SNIFF_SAMPLER='nope' is invalid"), result.stdout + result.stderr
    assert "transformers" not in result.stdout


def test_unknown_variable_is_refused_with_the_closest_name(tmp_path):
    with pytest.raises(
        ValueError, match=r"^QK_SNIFF_SAMPLR is not a qk-attn variable \(did you mean QK_SNIFF_SAMPLER\?\)"
    ):
        SniffConfig.from_env({"QK_SNIFF_SAMPLR": "all"})
    assert SniffConfig.from_env({"QK_SNIFF_CACHE": "/tmp/x"}) == SniffConfig()  # the demo's variable
    env = {"QK_SNIFF_OUTPT": str(tmp_path), "PATH": "/usr/bin:/bin"}  # would otherwise record nothing, silently
    result = subprocess.run(
        [sys.executable, "-c", "import qk_attn"], env=env, capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode != 0 and "did you mean QK_SNIFF_OUTPUT?" in result.stderr
    # Names are upper case: a lower-case one would leave capture off, silently.
    with pytest.raises(ValueError, match=r"^qk_sniff_output is not a qk-attn variable \(did you mean QK_SNIFF_OUTPUT"):
        SniffConfig.from_env({"qk_sniff_output": str(tmp_path)})
    # A misspelt prefix too: the variable would be ignored, and capture would use its default.
    for variable in ("QK_SNIF_OUTPUT", "QKSNIFF_OUTPUT", "QK__SNIFF_OUTPUT", "QK_SNIFFF_RATE"):
        with pytest.raises(ValueError, match=rf"^{variable} is not a qk-attn variable \(did you mean QK_SNIFF_"):
            SniffConfig.from_env({variable: "x"})
    assert SniffConfig.from_env({"QK_SNAP": "x", "QKV_SNIFF": "x"}) == SniffConfig()  # not ours
    # Nor another tool's variables that begin with the same letters: they made `import qk_attn` fail.
    assert SniffConfig.from_env({"QK_SNIFFER_MODE": "1", "QKSNIFTY_HOME": "/x"}) == SniffConfig()
    with pytest.raises(ValueError, match=r"^QK_SNIFF_MODE is not a qk-attn variable"):  # our prefix: always ours
        SniffConfig.from_env({"QK_SNIFF_MODE": "1"})


def test_index_lists():
    assert parse_index_list("layers", "3, 1,1-2") == (1, 2, 3)
    assert parse_index_list("layers", [4, 2]) == (2, 4)
    assert parse_index_list("layers", np.array([4, 2])) == (2, 4) == parse_index_list("layers", torch.tensor([4, 2]))
    assert SniffConfig(capture=" k , q ").capture == "q,k"
    assert parse_index_list("layers", "") is None and parse_index_list("layers", None) is None


def test_replace_and_session_reject_unknown_settings_with_the_closest_name():
    with pytest.raises(TypeError, match=r"^unknown setting 'samplr' \(did you mean sampler\?\)"):
        SniffConfig().replace(samplr="all")
    import qk_attn

    with pytest.raises(TypeError, match=r"^unknown setting 'min_bucket' \(did you mean min_bucket_size\?\)"):
        with qk_attn.session(min_bucket=64):
            pass
    with pytest.raises(TypeError, match=r"^unknown setting 'exampel_ids' \(did you mean example_ids\?\)"):
        with qk_attn.session(exampel_ids=[1]):  # session()'s own keywords are among the known ones
            pass


def test_qk_sniff_output_is_read_without_surrounding_whitespace():
    """Every other variable's value is; "out " made a folder named with a trailing space."""
    assert SniffConfig.from_env({"QK_SNIFF_OUTPUT": " out "}).output == "out"


@pytest.mark.parametrize("value", [[], (), set()])
def test_an_empty_head_or_layer_list_is_refused_not_read_as_all(value):
    """`heads=[]` used to record every query head (`heads or range(...)`), `layers=[]` nothing."""
    import qk_attn

    with pytest.raises(ValueError, match=r"^heads=.* is invalid: expected at least one query head; omit it"):
        SniffConfig(heads=value)
    with pytest.raises(ValueError, match=r"^heads=.* is invalid: expected at least one query head"):
        with qk_attn.session(heads=value):
            pass
    with pytest.raises(ValueError, match=r"^layers=.* is invalid: expected at least one layer"):
        SniffConfig(layers=value)
    # unset (or empty, the shell's way of unsetting) means every head, as omitting the keyword does
    assert SniffConfig.from_env({"QK_SNIFF_HEADS": ""}).heads is None


@pytest.mark.parametrize("value", [[], (), set()])
def test_an_empty_key_heads_list_is_refused_not_read_as_no_keys(value):
    """`key_heads=[]` recorded no keys at all while the capture said q,k; no keys is capture="q"."""
    import qk_attn
    from qk_attn.run.config import RunConfig

    says = r"key_heads=.* is invalid: expected at least one key head; omit it .* or record queries only \(capture='q'"
    with pytest.raises(ValueError, match=rf"^{says}") as error:
        SniffConfig(key_heads=value)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match=rf"^{says}"):
        with qk_attn.session(key_heads=value):
            pass
    # a run configuration reads it through SniffConfig, named by its YAML key
    minimal = {"dataset": {"path": "docs.jsonl"}, "model": {"name": "some/model"}, "output": {"data_root": "out"}}
    with pytest.raises(ValueError, match=r"^capture\.key_heads=\[\] is invalid: expected at least one key head"):
        RunConfig.load(None, ["capture.key_heads=[]"], base=minimal).sniff_config()
    # unset, empty or all: the key heads the recorded query heads read, as omitting it does
    for unset in (None, "", "all"):
        assert SniffConfig(key_heads=unset).key_heads is None
    assert SniffConfig.from_env({"QK_SNIFF_KEY_HEADS": ""}).key_heads is None


@pytest.mark.parametrize(
    "setting, value, allowed",
    [
        ("layers", [0.9], "comma-separated"),
        ("layers", {1: "x"}, "comma-separated"),
        ("layers", [True], "comma-separated"),
        ("layers", 1.5, "comma-separated"),
        ("heads", True, "comma-separated"),
        ("seed", True, "an integer >= 0"),
        ("seed", 1.0, "an integer >= 0"),
        # The whole rule, for 0 and 128.0 as for 3 (they said "an integer >= 1", then the next try said the rest).
        ("min_bucket_size", True, "a power of two from 1 to 2**62"),
        ("min_bucket_size", 128.0, "a power of two from 1 to 2**62"),
        ("min_bucket_size", 0, "a power of two from 1 to 2**62"),
        ("min_bucket_size", "1e3", "a power of two from 1 to 2**62"),
        ("head_sample_count", 2.5, "an integer >= 1"),
        ("pinned_mb", True, "an integer >= 1"),
        ("base_rate", True, "a finite number > 0"),
        ("base_rate", float("nan"), "a finite number > 0"),
        ("base_rate", float("inf"), "a finite number > 0"),
        ("base_rate", "nan", "a finite number > 0"),
        ("output", 5, "a folder path"),
        ("output", " ", "a folder path (empty or unset: no output)"),  # a folder named " " is a typo
        ("base_rate", 10**400, "a finite number > 0"),  # beyond a float
        ("sampler", "uni form", "log_uniform | uniform | all"),  # spaces are not dropped inside a value
        ("key_heads", "0", "unset while capture='q'"),  # key heads of no recorded keys
    ],
)
def test_wrong_types_and_non_finite_numbers_are_refused_not_coerced(setting, value, allowed):
    with pytest.raises(ValueError) as error:
        SniffConfig(**{setting: value}, **({"capture": "q"} if setting == "key_heads" else {}))
    assert str(error.value).startswith(f"{setting}={value!r} is invalid: expected ") and allowed in str(error.value)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN"])
def test_a_non_finite_base_rate_from_the_environment_names_the_variable(value):
    with pytest.raises(ValueError, match=rf"^QK_SNIFF_BASE_RATE='{value}' is invalid: expected a finite number > 0$"):
        SniffConfig.from_env({"QK_SNIFF_BASE_RATE": value})


def test_pinned_mb_beyond_this_hosts_memory_is_refused_when_read():
    with pytest.raises(ValueError, match=r"^QK_SNIFF_PINNED_MB='100000000' is invalid: expected an integer from 1 to"):
        SniffConfig.from_env({"QK_SNIFF_PINNED_MB": "100000000"})
    assert SniffConfig(pinned_mb=1024).pinned_mb == 1024


def test_index_lists_take_ints_and_strings_only():
    assert parse_index_list("layers", ["1-2", 0]) == (0, 1, 2)
    assert parse_index_list("layers", 3) == (3,)
    for bad in ([0.9], [False], {1: "x"}, 1.5, True, [[0]]):
        with pytest.raises(ValueError, match="comma-separated"):
            parse_index_list("layers", bad)


# ---- bounds, home folders, plain numbers, the command line ----------------------------------------
def test_a_min_bucket_size_beyond_2_to_62_is_refused_when_read():
    """The largest log-uniform bucket, min_bucket_size << 62, must be a finite float: 2**1000 passed
    the power-of-two check and then failed inside the forward with an OverflowError."""
    for value in (2**63, 2**1000):
        with pytest.raises(
            ValueError, match=r"^min_bucket_size=\d+ is invalid: expected a power of two from 1 to 2\*\*62"
        ):
            SniffConfig(min_bucket_size=value)
    with pytest.raises(ValueError, match=r"^QK_SNIFF_MIN_BUCKET_SIZE='\d+' is invalid: .* from 1 to 2\*\*62"):
        SniffConfig.from_env({"QK_SNIFF_MIN_BUCKET_SIZE": str(2**1000)})
    assert SniffConfig(min_bucket_size=2**62).min_bucket_size == 2**62


def test_the_largest_min_bucket_size_records_a_forward():
    """2**62 is usable: its largest bucket's keep probability is a finite float, in a real forward."""
    import qk_attn
    from support.models import build

    model = build("llama3", "qk_sniff")
    with qk_attn.session(sampler="log_uniform", min_bucket_size=2**62, base_rate=2**70) as s:
        with torch.no_grad():
            model(input_ids=torch.arange(2, 10)[None])
    assert sorted(set(s.table()["position"].to_pylist())) == list(range(8))  # base_rate above every bucket's size
    assert set(s.table()["bucket"].to_pylist()) == {0}


def test_an_output_under_home_is_expanded(tmp_path, monkeypatch):
    """`~/x` is the home folder's x, as for qk_attn.load("~/x"), never a folder named `~` here."""
    import qk_attn
    from support.models import build

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert SniffConfig(output="~/x").output == str(tmp_path / "home" / "x")
    assert SniffConfig.from_env({"QK_SNIFF_OUTPUT": "~/x"}).output == str(tmp_path / "home" / "x")
    model = build("llama3", "qk_sniff")
    with qk_attn.session(output="~/x", sampler="all", layers="0"):
        with torch.no_grad():
            model(input_ids=torch.arange(2, 6)[None])
    assert not (tmp_path / "~").exists()
    assert qk_attn.load("~/x", layer=0, head=0, kind="q").num_rows == 4


@pytest.mark.parametrize(
    "name, value",
    [
        ("MIN_BUCKET_SIZE", "1_024"),
        ("MIN_BUCKET_SIZE", "+4"),
        ("MIN_BUCKET_SIZE", "\u0664"),  # Arabic-Indic 4
        ("SEED", "1_0"),
        ("SEED", "\u0663"),
        ("HEAD_SAMPLE_COUNT", "+3"),
        ("HEAD_SAMPLE_SEED", "\u0663"),
        ("PINNED_MB", "6_4"),
        ("LAYERS", "1_0"),
        ("LAYERS", "\u0663"),
        ("HEADS", "+1"),
        ("KEY_HEADS", "0-\u0663"),
        ("BASE_RATE", "1_024"),
        ("BASE_RATE", "\u0663"),
        ("BASE_RATE", "infinity"),
    ],
)
def test_numbers_are_plain_ascii(name, value):
    """int() and float() take underscores, a plus sign and other scripts' digits: a setting does not."""
    with pytest.raises(ValueError) as error:
        SniffConfig.from_env({f"QK_SNIFF_{name}": value})
    assert str(error.value).startswith(f"QK_SNIFF_{name}={value!r} is invalid: expected ")
    assert "\n" not in str(error.value)


def test_plain_numbers_with_spaces_around_them_are_read():
    config = SniffConfig.from_env(
        {"QK_SNIFF_MIN_BUCKET_SIZE": " 8192 ", "QK_SNIFF_SEED": "\t7\n", "QK_SNIFF_BASE_RATE": " 2e3 "}
    )
    assert (config.min_bucket_size, config.seed, config.base_rate) == (8192, 7, 2000.0)
    assert SniffConfig.from_env({"QK_SNIFF_BASE_RATE": ".5"}).base_rate == 0.5
    assert SniffConfig.from_env({"QK_SNIFF_LAYERS": " 1 - 2 ,4"}).layers == (1, 2, 4)


@pytest.mark.parametrize(
    "value, expected", [("1", True), ("TRUE", True), ("on", True), ("0", False), ("no", False), ("", False)]
)
def test_full_attention_only_takes_the_true_false_words_and_says_so(value, expected):
    assert SniffConfig.from_env({"QK_SNIFF_FULL_ATTENTION_ONLY": value}).full_attention_only is expected
    message = "QK_SNIFF_FULL_ATTENTION_ONLY='2' is invalid: expected 0 or 1 (or true/false, yes/no, on/off)"
    with pytest.raises(ValueError, match=rf"^{re.escape(message)}$"):
        SniffConfig.from_env({"QK_SNIFF_FULL_ATTENTION_ONLY": "2"})


@pytest.mark.parametrize(
    "argv, module",
    [
        (["python", "-m", "qk_attn.cli", "verify", "out"], "qk_attn.cli"),
        (["python", "-mqk_attn.cli", "verify", "out"], "qk_attn.cli"),
        (["python", "-u", "-m", "qk_attn.cli", "run"], "qk_attn.cli"),
        (["python", "-Im", "qk_attn.cli"], "qk_attn.cli"),
        (["python", "-Bumqk_attn.cli"], "qk_attn.cli"),
        (["python", "-W", "ignore", "-X", "dev", "-m", "qk_attn.cli"], "qk_attn.cli"),
        (["python", "-Werror", "--check-hash-based-pycs", "never", "-mqk_attn.cli"], "qk_attn.cli"),
        (["python", "-m", "pytest", "-m", "qk_attn.cli"], "pytest"),
        (["python", "script.py", "-m", "qk_attn.cli"], None),
        (["python", "-c", "import qk_attn", "-m", "qk_attn.cli"], None),
        (["python", "-"], None),
        (["python"], None),
    ],
)
def test_the_module_run_with_dash_m_is_read_from_the_interpreter_command_line(argv, module):
    assert main_module(argv) == module


@pytest.mark.parametrize("where", ["a file", "under a file", "a folder of someone else's"])
def test_an_env_output_that_cannot_hold_a_capture_fails_at_import(tmp_path, where):
    """QK_SNIFF_OUTPUT was first checked at the first forward (every forward then raised), though the README
    refuses QK_SNIFF_* values at import. A new folder is fine."""
    (tmp_path / "file").write_text("mine")
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("theirs")
    output = {"a file": "file", "under a file": "file/out", "a folder of someone else's": "theirs"}[where]
    script = "try:\n import qk_attn\nexcept ValueError as e:\n print(type(e).__name__, e)\nelse:\n print('imported')"
    env = {"QK_SNIFF_OUTPUT": str(tmp_path / output), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert result.stdout.startswith(f"ConfigError QK_SNIFF_OUTPUT='{tmp_path / output}' is invalid: "), result
    env["QK_SNIFF_OUTPUT"] = str(tmp_path / "new" / "capture")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert result.stdout.strip() == "imported" and not (tmp_path / "new").exists()


FLASH_REFUSED = (
    r"is invalid: expected sdpa \| eager; flash attention is recorded under its own name: call "
    r'qk_attn.wrap_flash_attention\(\) and load the model with attn_implementation="flash_attention_2"'
)


def test_a_flash_backend_is_refused_when_read_not_in_the_first_forward(tmp_path):
    """QK_SNIFF_BACKEND=flash_attention_2 and session(backend="flash_attention_2") were accepted, then the first
    forward raised a plain ValueError from "qk_sniff" (flash is recorded under its own name), after the default
    session had made its folder. A SniffConfig keeps it as a label: a run configuration's inference.backend."""
    import qk_attn

    with pytest.raises(qk_attn.ConfigError, match=r"^QK_SNIFF_BACKEND='flash_attention_2' " + FLASH_REFUSED):
        SniffConfig.from_env({"QK_SNIFF_BACKEND": "flash_attention_2"})
    out = tmp_path / "out"
    with pytest.raises(qk_attn.ConfigError, match=r"^backend='flash_attention_2' " + FLASH_REFUSED):
        with qk_attn.session(output=out, backend="flash_attention_2"):
            pass
    assert not out.exists()
    assert SniffConfig(backend="flash_attention_2").backend == "flash_attention_2"
    env = {"QK_SNIFF_BACKEND": "flash_attention_2", "QK_SNIFF_OUTPUT": str(out), "PATH": "/usr/bin:/bin"}
    script = "try:\n import qk_attn\nexcept ValueError as e:\n print(type(e).__name__, e)"
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert re.match(r"ConfigError QK_SNIFF_BACKEND='flash_attention_2' " + FLASH_REFUSED, result.stdout), result
    assert len(result.stdout.splitlines()) == 1 and not out.exists()


def test_a_flash_backend_is_taken_once_flash_attention_records():
    """As qk-sniff run does for inference.backend: flash_attention_2, whose session opens after it wrapped flash."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    import qk_attn

    saved = dict(AttentionInterface._global_mapping), dict(AttentionMaskInterface._global_mapping)
    try:
        qk_attn.wrap_flash_attention()
        assert SniffConfig.from_env({"QK_SNIFF_BACKEND": "flash_attention_2"}).backend == "flash_attention_2"
        with qk_attn.session(backend="flash_attention_2") as s:
            assert s.config.backend == "flash_attention_2"
        with pytest.raises(ValueError, match=r"^QK_SNIFF_BACKEND='flex' is invalid: expected sdpa \| eager \| flash"):
            SniffConfig.from_env({"QK_SNIFF_BACKEND": "flex"})
    finally:
        for interface, mapping in zip((AttentionInterface, AttentionMaskInterface), saved):
            interface._global_mapping.clear()
            interface._global_mapping.update(mapping)


def test_the_readme_says_which_head_sample_seeds_are_taken():
    """The README said "any integer", but the variable, the keyword and a run configuration's
    capture.head_sampling.seed all refuse a negative seed: the README says >= 0, as they do."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("| `QK_SNIFF_HEAD_SAMPLE_SEED` |"))
    assert "any integer" not in row and "an integer from 0 to 2**63 - 1" in row, row
    with pytest.raises(ValueError, match=r"^QK_SNIFF_HEAD_SAMPLE_SEED='-5' is invalid: expected an integer >= 0"):
        SniffConfig.from_env({"QK_SNIFF_HEAD_SAMPLE_SEED": "-5"})
    with pytest.raises(ValueError, match=r"^head_sample_seed=-5 is invalid: expected an integer >= 0"):
        SniffConfig(head_sample_seed=-5)
    # The variable took any size where a run configuration refuses 2**63 and above: the same range now.
    counted = {"QK_SNIFF_HEAD_SAMPLE_COUNT": "2"}
    assert SniffConfig.from_env({**counted, "QK_SNIFF_HEAD_SAMPLE_SEED": str(2**63 - 1)}).head_sample_seed == 2**63 - 1
    with pytest.raises(ValueError, match=r"^QK_SNIFF_HEAD_SAMPLE_SEED='9223372036854775808' is invalid: .*2\*\*63"):
        SniffConfig.from_env({**counted, "QK_SNIFF_HEAD_SAMPLE_SEED": str(2**63)})
    with pytest.raises(ValueError, match=r"^capture.head_sampling.seed=9223372036854775808 is invalid: .*2\*\*63"):
        validate("capture.head_sampling.seed", 2**63, "int", None, 0, True)


def test_a_head_sample_seed_without_a_count_does_not_block_a_resume(tmp_path):
    """It draws no sample (every head is recorded), yet was part of the folder's settings: a resume with
    another seed, or none, was refused. It is no longer compared where no count is set (folders written
    with one resume as they are); with a count it is."""
    import qk_attn
    from support.models import build

    model, ids = build("llama3", "qk_sniff"), torch.tensor([[2, 3, 4, 5]])
    out = tmp_path / "out"
    for i, settings in enumerate(({"head_sample_seed": 5}, {"head_sample_seed": 6}, {})):
        with torch.inference_mode(), qk_attn.session(output=out, sampler="all", example_ids=[i], **settings):
            model(input_ids=ids)
    assert sorted(qk_attn.load_examples(out)["example_id"].to_pylist()) == [0, 1, 2]
    counted = tmp_path / "counted"
    with torch.inference_mode(), qk_attn.session(output=counted, head_sample_count=2, head_sample_seed=5):
        model(input_ids=ids)
    with pytest.raises(ValueError, match=r"different settings \(head_sample_seed: 5 there, 6 now\)"):
        with qk_attn.session(output=counted, head_sample_count=2, head_sample_seed=6):
            model(input_ids=ids)


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(SniffConfig)])
def test_an_empty_variable_is_unset_for_every_variable(name):
    """`QK_SNIFF_SEED=` was refused while `QK_SNIFF_LAYERS=` meant all: an empty variable is now unset for
    every variable, as the shell's `VAR= cmd` reads, whatever its type."""
    variable = "QK_SNIFF_" + name.upper()
    for empty in ("", "  "):
        assert SniffConfig.from_env({variable: empty}) == SniffConfig.from_env({})


def test_an_env_output_holding_a_capture_of_other_settings_fails_at_import_and_at_reload(tmp_path, monkeypatch):
    """It was refused inside every forward, naming `sampler` (not QK_SNIFF_SAMPLER) and advising
    overwrite=True, which the environment has not; reload_env() took it too. Refused at import and at
    reload_env(), naming the variables; the same settings resume it."""
    import qk_attn
    from qk_attn.errors import ConfigError
    from support.models import build

    out = tmp_path / "out"
    with torch.inference_mode(), qk_attn.session(output=out, sampler="all", layers="0"):
        build("llama3", "qk_sniff")(input_ids=torch.tensor([[2, 3, 4]]))
    script = "try:\n import qk_attn\nexcept ValueError as e:\n print(type(e).__name__, e)\nelse:\n print('imported')"
    env = {"QK_SNIFF_OUTPUT": str(out), "QK_SNIFF_SAMPLER": "uniform", "QK_SNIFF_LAYERS": "0", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert result.stdout.startswith(
        f"ConfigError QK_SNIFF_OUTPUT='{out}' is invalid: it holds a capture with other settings (QK_SNIFF_SAMPLER: "
        "'all' there, 'uniform' now): set the same values to resume it"
    ), result
    env["QK_SNIFF_SAMPLER"] = "all"
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert result.stdout.strip() == "imported", result
    for name, value in {**env, "QK_SNIFF_SAMPLER": "uniform"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=r"^QK_SNIFF_OUTPUT=.* other settings \(QK_SNIFF_SAMPLER: 'all' there"):
        qk_attn.reload_env()
    # A setting the capture has and the environment leaves unset is named by its variable too (it was `layers`).
    monkeypatch.setenv("QK_SNIFF_SAMPLER", "all")
    monkeypatch.delenv("QK_SNIFF_LAYERS")
    with pytest.raises(ConfigError, match=r"other settings \(QK_SNIFF_LAYERS \(unset\): \[0\] there, None now\)"):
        qk_attn.reload_env()
