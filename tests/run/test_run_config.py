"""`qk-sniff run` configuration: sections, keys, --set overrides, mapping onto SniffConfig."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from qk_attn.config import SniffConfig
from qk_attn.demo import DEMO_CONFIG
from qk_attn.errors import ConfigError
from qk_attn.run.config import RunConfig
from qk_attn.run.yaml_text import apply_override

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
MINIMAL = {"dataset": {"path": "docs.jsonl"}, "model": {"name": "some/model"}, "output": {"data_root": "out"}}


def config(**sections) -> RunConfig:
    data = {k: dict(v) for k, v in MINIMAL.items()}
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return RunConfig.from_dict(data)


def test_demo_yaml_is_the_embedded_demo():
    assert yaml.safe_load((CONFIGS / "demo.yaml").read_text()) == DEMO_CONFIG
    sniff = RunConfig.from_dict(DEMO_CONFIG).sniff_config()
    assert (sniff.sampler, sniff.min_bucket_size, sniff.base_rate, sniff.capture) == ("log_uniform", 32, 8.0, "q,k")
    assert sniff.output == "qk-sniff-demo"


@pytest.mark.parametrize("name", ["longbench-pro-llama-3.1-8b.yaml", "longbench-pro-qwen3-8b-yarn.yaml"])
def test_production_configs(name):
    run = RunConfig.load(CONFIGS / name)
    sniff = run.sniff_config()
    assert run.dataset.path == "viktoroo/longbench-pro-128k-plus" and run.dataset.split == "test"
    assert run.tokenizer.max_length == 131072 and run.model.dtype == "bfloat16"
    assert (sniff.sampler, sniff.min_bucket_size, sniff.base_rate) == ("uniform", 8192, 1.0)
    assert (sniff.head_sample_count, sniff.head_sample_seed, sniff.full_attention_only) == (300, 0, True)
    assert run.tokenizer_name == run.model.name
    if "qwen3" in name:
        assert run.model.config_overrides["rope_parameters"]["rope_type"] == "yarn"


def test_defaults():
    run = config()
    assert run.dataset.split == "train" and run.dataset.text_column == "text" and run.dataset.id_column is None
    assert run.inference.batch_size == 1 and run.tokenizer.padding_side == "right"
    sniff = run.sniff_config()
    assert (sniff.sampler, sniff.capture, sniff.rope, sniff.backend) == ("log_uniform", "q,k", "post", "sdpa")


@pytest.mark.parametrize(
    "section, key",
    [
        ("dataset", "text_col"),
        ("model", "dtpye"),
        ("tokenizer", "maxlen"),
        ("inference", "batch"),
        ("capture", "samplr"),
        ("output", "repo"),
    ],
)
def test_unknown_key_names_key_and_section(section, key):
    with pytest.raises(ConfigError) as error:
        config(**{section: {key: 1}})
    assert repr(key) in str(error.value) and repr(section) in str(error.value)


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ConfigError, match="did you mean 'text_column'"):
        config(dataset={"text_colum": "body"})


def test_unknown_section_and_nested_keys():
    with pytest.raises(ConfigError, match="'datasets'.*top level"):
        RunConfig.from_dict({**MINIMAL, "datasets": {}})
    with pytest.raises(ConfigError, match="'kind' in capture.sampler"):
        config(capture={"sampler": {"kind": "uniform"}}).sniff_config()
    with pytest.raises(ConfigError, match="'number' in capture.head_sampling"):
        config(capture={"head_sampling": {"number": 3}})


def test_required_keys():
    for section, key in (("dataset", "path"), ("model", "name"), ("output", "data_root")):
        data = {k: dict(v) for k, v in MINIMAL.items()}
        del data[section][key]
        with pytest.raises(ConfigError, match=f"{section}.{key} is required"):
            RunConfig.from_dict(data)


def test_type_errors_name_the_key():
    with pytest.raises(ConfigError, match="inference.batch_size"):
        config(inference={"batch_size": 0})
    with pytest.raises(ConfigError, match="model.dtype"):
        config(model={"dtype": "float64"})
    with pytest.raises(ConfigError, match="dataset.streaming"):
        config(dataset={"streaming": "maybe"})
    with pytest.raises(ConfigError, match="tokenizer.padding_side"):
        config(tokenizer={"padding_side": "middle"})


def test_capture_values_are_checked_when_read_and_name_the_yaml_key(monkeypatch):
    monkeypatch.setenv("QK_SNIFF_LAYERS", "0")  # the environment never names a YAML value
    cases = [
        ({"min_bucket_size": 100}, r"^capture\.min_bucket_size=100 is invalid: expected a power of two"),
        ({"sampler": "gaussian"}, r"^capture\.sampler='gaussian' is invalid: expected log_uniform \| uniform \| all$"),
        ({"layers": "1-x"}, r"^capture\.layers='1-x' is invalid: expected comma-separated"),
        ({"head_sampling": {"count": 0}}, r"^capture\.head_sampling\.count=0 is invalid"),
        (
            {"sampler": {"type": "uniform", "base_rate": -1}},
            r"^capture\.sampler\.base_rate=-1 is invalid: expected a finite number > 0",
        ),
        ({"base_rate": 0}, r"^capture\.base_rate=0 is invalid"),
        ({"vector_dtype": "bf16"}, r"^capture\.vector_dtype='bf16' is invalid: expected float32 \| float16"),
        ({"max_gb": 0}, r"^capture\.max_gb=0 is invalid: expected a finite number > 0"),
        ({"max_gb": "lots"}, r"^capture\.max_gb='lots' is invalid: expected a finite number"),
    ]
    for capture, pattern in cases:
        with pytest.raises(ConfigError, match=pattern) as error:
            config(capture=capture)
        assert "QK_SNIFF" not in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(ConfigError, match=r"^inference\.backend='flex' is invalid"):
        config(inference={"backend": "flex"})
    assert config(capture={"max_gb": 2.5}).capture.max_gb == 2.5


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        # an empty head list would have recorded every head (plan.py read it as "all")
        (["capture.heads=[]"], r"^capture\.heads=\[\] is invalid: expected at least one query head; omit it"),
        (["capture.layers=[]"], r"^capture\.layers=\[\] is invalid: expected at least one layer"),
        # wrong types are refused, never truncated or read as 1
        (["capture.layers=[0.9]"], r"^capture\.layers=\[0\.9\] is invalid: expected comma-separated"),
        (["capture.layers={1: x}"], r"^capture\.layers=\{1: 'x'\} is invalid: expected comma-separated"),
        (["capture.layers=[true]"], r"^capture\.layers=\[True\] is invalid: expected comma-separated"),
        (["capture.layers=1.5"], r"^capture\.layers=1\.5 is invalid: expected comma-separated"),
        (["capture.heads=2.0"], r"^capture\.heads=2\.0 is invalid: expected comma-separated"),
        (
            ["capture.sampler={type: all, seed: true}"],
            r"^capture\.sampler\.seed=True is invalid: expected an integer >= 0$",
        ),
        (
            ["capture.sampler={type: all, min_bucket_size: true}"],
            r"^capture\.sampler\.min_bucket_size=True is invalid: expected a power of two from 1 to 2\*\*62",
        ),
        (["capture.sampler={type: all, seed: 1.0}"], r"^capture\.sampler\.seed=1\.0 is invalid: expected an integer"),
        (["capture.base_rate=true"], r"^capture\.base_rate=True is invalid: expected a finite number > 0$"),
        # NaN and infinity are not rates or sizes (inf was written to qk_sniff.json as Infinity)
        (["capture.base_rate=.nan"], r"^capture\.base_rate=nan is invalid: expected a finite number > 0$"),
        (["capture.base_rate=.inf"], r"^capture\.base_rate=inf is invalid: expected a finite number > 0$"),
        (["capture.sampler.base_rate=.inf"], r"^capture\.sampler\.base_rate=inf is invalid: expected a finite number"),
        (["capture.max_gb=.inf"], r"^capture\.max_gb=inf is invalid: expected a finite number > 0$"),
        (["capture.max_gb=.nan"], r"^capture\.max_gb=nan is invalid: expected a finite number > 0$"),
        (
            ["inference.pinned_mb=100000000"],
            r"^inference\.pinned_mb=100000000 is invalid: expected an integer from 1 to",
        ),
        (["inference.pinned_mb=64.0"], r"^inference\.pinned_mb=64\.0 is invalid: expected an integer"),
        # past int64: a bare OverflowError from the tokenizer, after --dry-run had passed
        (["tokenizer.max_length=99999999999999999999999"], r"^tokenizer\.max_length=\d+ is invalid: .* below 2\*\*63$"),
        # expanded in memory before any check (a MemoryError)
        (["capture.layers=0-99999999999"], r"^capture\.layers='0-99999999999' is invalid: expected indices below"),
        # YAML reads 5 as a number: a column name is a string (it was taken as the column '5')
        (["dataset.text_column=5"], r"^dataset\.text_column=5 is invalid: expected a column name \(a string"),
        (["dataset.id_column=7"], r"^dataset\.id_column=7 is invalid: expected a column name \(a string"),
        # one of the two would be ignored, silently
        (["model.device_map=auto", "model.device=cpu"], r"^model\.device_map='auto' and model\.device='cpu' both"),
    ],
)
def test_set_values_of_the_wrong_type_or_not_finite_are_refused(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern) as error:
        RunConfig.load(None, overrides, base=MINIMAL)
    assert "\n" not in str(error.value)


def test_a_quoted_numeric_column_name_is_a_name():
    loaded = RunConfig.load(None, ["dataset.text_column='5'", "dataset.id_column='7'"], base=MINIMAL)
    assert (loaded.dataset.text_column, loaded.dataset.id_column) == ("5", "7")


def test_sampler_as_mapping_or_flat_keys():
    nested = config(capture={"sampler": {"type": "uniform", "base_rate": 2, "min_bucket_size": 64, "seed": 5}})
    flat = config(capture={"sampler": "uniform", "base_rate": 2, "min_bucket_size": 64, "seed": 5})
    assert nested.sniff_config() == flat.sniff_config()
    assert nested.sniff_config().sampler_dict() == {
        "sampler": "uniform",
        "min_bucket_size": 64,
        "base_rate": 2.0,
        "seed": 5,
    }
    with pytest.raises(ConfigError, match="disagree"):
        config(capture={"sampler": {"type": "uniform", "base_rate": 2}, "base_rate": 3})
    # Both given, one invalid: refused as invalid (it was "disagree"), named where it was written; equal as read.
    with pytest.raises(ConfigError, match=r"^capture\.base_rate='1_0' is invalid: expected a finite number > 0"):
        config(capture={"sampler": {"type": "uniform", "base_rate": 1.0}, "base_rate": "1_0"})
    with pytest.raises(ConfigError, match=r"^capture\.sampler\.min_bucket_size=3 is invalid: expected a power of two"):
        config(capture={"sampler": {"type": "uniform", "min_bucket_size": 3}, "min_bucket_size": 4})
    same = config(capture={"sampler": {"type": "uniform", "base_rate": 2}, "base_rate": 2.0})
    assert same.sniff_config().base_rate == 2.0


def test_capture_kinds_rope_and_heads_map_onto_sniff_config():
    sniff = config(
        capture={
            "capture_queries": False,
            "capture_pre_rope": True,
            "layers": "0,3,10-12",
            "heads": [1, 0],
            "key_heads": "0",
            "full_attention_only": True,
            "vector_dtype": "float16",
        },
        inference={"backend": "eager", "pinned_mb": 64},
    ).sniff_config()
    assert (sniff.capture, sniff.rope, sniff.full_attention_only) == ("k", "pre", True)
    assert (sniff.layers, sniff.heads, sniff.key_heads) == ((0, 3, 10, 11, 12), (0, 1), (0,))
    assert (sniff.vector_dtype, sniff.backend, sniff.pinned_mb) == ("float16", "eager", 64)
    with pytest.raises(ConfigError, match="both false"):
        config(capture={"capture_queries": False, "capture_keys": False})
    assert config(capture={"capture_token_strings": True}).capture.capture_token_strings is True


def test_a_set_subkey_keeps_the_shorthand_it_refines(tmp_path):
    """`head_sampling: 3` then --set capture.head_sampling.seed=5 became {seed: 5}: head sampling off, every
    pair recorded, silently. A shorthand keeps its meaning, as the sampler's name does."""
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL, "capture": {"head_sampling": 3, "sampler": "uniform"}}))
    sniff = RunConfig.load(path, ["capture.head_sampling.seed=5", "capture.sampler.base_rate=2"]).sniff_config()
    assert (sniff.head_sample_count, sniff.head_sample_seed, sniff.sampler, sniff.base_rate) == (3, 5, "uniform", 2)
    # A seed without a count (no shorthand to refine) would be recorded and draw nothing: refused.
    path.write_text(yaml.safe_dump({**MINIMAL, "capture": {"head_sampling": {"seed": 5}}}))
    with pytest.raises(ConfigError, match=r"^capture.head_sampling.seed=5 needs capture.head_sampling.count: "):
        RunConfig.load(path).sniff_config()


def test_key_heads_without_keys_names_the_yaml_keys(tmp_path):
    """It named SniffConfig's `capture='q'`, a value no run configuration holds."""
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL, "capture": {"key_heads": "0", "capture_keys": False}}))
    with pytest.raises(ConfigError, match=r"^capture.key_heads='0' cannot apply while capture.capture_keys is false"):
        RunConfig.load(path).sniff_config()


def test_set_overrides_keep_yaml_types(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    run = RunConfig.load(
        path,
        [
            "capture.base_rate=2.5",
            "capture.layers=0,3,10-12",
            "dataset.streaming=true",
            "inference.batch_size=4",
            "capture.head_sampling.count=7",
            "model.config_overrides={max_position_embeddings: 131072}",
            "tokenizer.max_length=512",
            "capture.sampler=uniform",
            "capture.sampler.seed=3",
        ],
    )
    sniff = run.sniff_config()
    assert (sniff.base_rate, sniff.layers, sniff.head_sample_count) == (2.5, (0, 3, 10, 11, 12), 7)
    assert (sniff.sampler, sniff.seed) == ("uniform", 3)
    assert run.dataset.streaming is True and run.inference.batch_size == 4 and run.tokenizer.max_length == 512
    assert run.model.config_overrides == {"max_position_embeddings": 131072}


def test_set_errors():
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_override({}, "capture.base_rate")
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_override({}, "base_rate=2")
    with pytest.raises(ConfigError, match="'capture'.*'bse_rate'|'bse_rate'.*'capture'"):
        apply_override({}, "capture.bse_rate=2")
    with pytest.raises(ConfigError, match="'captur'"):
        apply_override({}, "captur.base_rate=2")


def test_set_on_the_embedded_demo():
    run = RunConfig.load(None, ["tokenizer.max_length=256", "dataset.max_samples=1"], base=DEMO_CONFIG)
    assert run.tokenizer.max_length == 256 and run.dataset.max_samples == 1
    assert DEMO_CONFIG["tokenizer"]["max_length"] == 2048  # the embedded dict is not modified


def test_missing_or_bad_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        RunConfig.load(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="^config file '/dev/null' is not a regular file$"):  # was "does not exist"
        RunConfig.load("/dev/null")
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        RunConfig.load(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        RunConfig.load(bad)


def test_environment_does_not_change_a_run(monkeypatch):
    monkeypatch.setenv("QK_SNIFF_VECTOR_DTYPE", "float16")
    monkeypatch.setenv("QK_SNIFF_BASE_RATE", "5")
    monkeypatch.setenv("QK_SNIFF_LAYERS", "1")
    settings = config().sniff_settings()
    assert set(settings) == set(SniffConfig.field_names())
    from_env = SniffConfig.from_env(**settings)  # what qk_attn.session(**settings) builds
    assert (from_env.vector_dtype, from_env.base_rate, from_env.layers) == ("float32", 1.0, None)


def test_a_data_root_under_home_is_expanded_once_for_every_use(monkeypatch, tmp_path):
    """The run wrote under $HOME but printed and checked `./~/out` in its summary (no card, "No rows
    are committed"): the path is expanded where the configuration is read."""
    monkeypatch.setenv("HOME", str(tmp_path))
    run = RunConfig.from_dict({**MINIMAL, "output": {"data_root": "~/out"}})
    assert run.output.data_root == str(tmp_path / "out")
    assert run.sniff_config().output == str(tmp_path / "out")


@pytest.mark.parametrize("split", ["train[:3]", "train[50%:]", "train[:3]+train[-2:]", "train+test"])
def test_a_sliced_split_cannot_be_streamed_and_the_keys_are_named(split):
    """It failed in datasets' loader as `dataset.path='docs.jsonl' cannot be read: ValueError: Bad split`."""
    data = {**MINIMAL, "dataset": {**MINIMAL["dataset"], "split": split, "streaming": True}}
    with pytest.raises(ConfigError, match=rf"^dataset.split='{re.escape(split)}' cannot be streamed \(dataset"):
        RunConfig.from_dict(data)
    assert RunConfig.from_dict({**data, "dataset": {**data["dataset"], "streaming": False}}).dataset.split == split
