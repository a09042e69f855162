import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from berth.core.config import ConfigError, dump_config, load_config, save_config


@dataclass(frozen=True)
class Train:
    max_steps: int = 10
    lr: float = 1e-3
    schedule: Literal["linear", "cosine"] = "linear"
    resume: str = ""
    bf16: bool = False
    strip: bool | None = None


@dataclass(frozen=True)
class Data:
    sources: tuple[str, ...] = ("a",)
    max_seq_len: int = 128


@dataclass(frozen=True)
class Job:
    output_dir: str = "runs/x"
    train: Train = field(default_factory=Train)
    data: Data = field(default_factory=Data)


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_yaml_and_overrides_are_typed(tmp_path):
    path = write(tmp_path, "train:\n  max_steps: 50\n  lr: 1\ndata:\n  sources: [x, y]\n")
    cfg = load_config(
        Job, path, ["train.schedule=cosine", "train.bf16=true", "output_dir=runs/y", "data.max_seq_len=64"]
    )
    assert cfg == Job(
        output_dir="runs/y",
        train=Train(max_steps=50, lr=1.0, schedule="cosine", bf16=True),
        data=Data(sources=("x", "y"), max_seq_len=64),
    )
    assert isinstance(cfg.train.lr, float)


def test_exponent_floats_without_a_dot(tmp_path):
    # YAML 1.1 reads 5e-4 as a string; a float field takes it as the number everyone means
    assert load_config(Job, write(tmp_path, "train:\n  lr: 5e-4\n")).train.lr == 5e-4
    assert load_config(Job, None, ["train.lr=1e-3"]).train.lr == 1e-3


def test_later_override_wins_and_strings_stay_strings(tmp_path):
    cfg = load_config(Job, None, ["train.max_steps=5", "train.max_steps=7", "train.resume=123", "output_dir=true"])
    assert cfg.train.max_steps == 7
    assert cfg.train.resume == "123"
    assert cfg.output_dir == "true"


def test_list_overrides_accept_yaml_list_or_single_item():
    assert load_config(Job, None, ["data.sources=[p, q]"]).data.sources == ("p", "q")
    assert load_config(Job, None, ["data.sources=data/*.txt"]).data.sources == ("data/*.txt",)


def test_optional_takes_null():
    assert load_config(Job, None, ["train.strip=null"]).train.strip is None
    assert load_config(Job, None, ["train.strip=false"]).train.strip is False


def test_unknown_key_names_it_and_lists_valid_keys(tmp_path):
    path = write(tmp_path, "train:\n  max_step: 5\n")
    with pytest.raises(ConfigError) as err:
        load_config(Job, path)
    message = str(err.value)
    assert "'train.max_step'" in message
    assert "did you mean 'train.max_steps'" in message
    assert "max_steps, lr, schedule, resume, bf16, strip" in message
    assert str(path) in message


def test_unknown_top_level_key_from_override():
    with pytest.raises(ConfigError, match=r"unknown key 'trian'.*valid keys at the top level: output_dir, train, data"):
        load_config(Job, None, ["trian.max_steps=3"])


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.max_steps=ten", "'train.max_steps' must be an integer; got 'ten'"),
        ("train.max_steps=1.5", "'train.max_steps' must be an integer; got 1.5"),
        ("train.max_steps=true", "'train.max_steps' must be an integer; got True"),
        ("train.lr=fast", "'train.lr' must be a number; got 'fast'"),
        ("train.bf16=maybe", "'train.bf16' must be true or false; got 'maybe'"),
        ("train.schedule=noam2", "'train.schedule' must be one of linear, cosine; got 'noam2'"),
        ("train=3", "'train' is a section"),
        ("train.max_steps", "expected section.key=value"),
    ],
)
def test_wrong_types_are_named(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(Job, None, [override])
    assert expected in str(err.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Job, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"c.yaml \(line 2\): not valid YAML"):
        load_config(Job, write(tmp_path, "train:\n\tmax_steps: 1\n"))
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(Job, write(tmp_path, "- 1\n- 2\n"))


def test_section_must_be_mapping(tmp_path):
    with pytest.raises(ConfigError, match="'train' must be a section"):
        load_config(Job, write(tmp_path, "train: 5\n"))


def test_config_is_read_only():
    cfg = load_config(Job)
    with pytest.raises(AttributeError):
        cfg.train.max_steps = 3


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(Job, None, ["data.sources=[a, b]", "train.lr=0.5"])
    path = save_config(cfg, tmp_path / "run")
    assert path.name == "config.yaml"
    assert yaml.safe_load(path.read_text()) == {
        "output_dir": "runs/x",
        "train": {"max_steps": 10, "lr": 0.5, "schedule": "linear", "resume": "", "bf16": False, "strip": None},
        "data": {"sources": ["a", "b"], "max_seq_len": 128},
    }
    assert load_config(Job, path) == cfg
    assert dump_config(load_config(Job, path)) == path.read_text()


@pytest.mark.parametrize(
    ("stage", "override", "message"),
    [
        ("pretrain", "train.lr=nan", "train: lr must be a finite number > 0; got nan"),
        ("pretrain", "train.lr=inf", "train: lr must be a finite number > 0; got inf"),
        ("pretrain", "train.lr=0", "train: lr must be a finite number > 0; got 0.0"),
        ("pretrain", "train.adam_beta1=1", "train: adam_beta1 must be in [0, 1); got 1.0"),
        ("pretrain", "train.adam_beta2=-0.1", "train: adam_beta2 must be in [0, 1); got -0.1"),
        ("pretrain", "train.adam_eps=0", "train: adam_eps must be a finite number > 0; got 0.0"),
        ("pretrain", "train.keep_checkpoints=-1", "train: keep_checkpoints must be >= 0; got -1"),
        ("pretrain", "train.max_grad_norm=0", "train: max_grad_norm must be a finite number > 0; got 0.0"),
        ("pretrain", "model.hidden_dropout=1.0", "model: hidden_dropout must be in [0, 1); got 1.0"),
        ("pretrain", "model.attention_dropout=-0.1", "model: attention_dropout must be in [0, 1); got -0.1"),
        ("finetune", "model.classifier_dropout=1.5", "model: classifier_dropout must be in [0, 1); got 1.5"),
        ("finetune", "model.hidden_dropout=nan", "model: hidden_dropout must be in [0, 1); got nan"),
        ("finetune", "train.warmup_ratio=1", "train: warmup_ratio must be in [0, 1); got 1.0"),
        ("finetune", "train.keep_checkpoints=-2", "train: keep_checkpoints must be >= 0; got -2"),
        ("finetune", "data.class_weights=[1,-2]", "data: class_weights must be finite, >= 0 and not all 0"),
        ("finetune", "data.class_weights=[0,0]", "data: class_weights must be finite, >= 0 and not all 0"),
        ("finetune", "data.hidden_training=1.5", "data: hidden_training must be in [0, 1]; got 1.5"),
        ("finetune", "data.hidden_weight=0", "data: hidden_weight must be in (0, 1]; got 0.0"),
        ("finetune", "data.outlier_exposure=-1", "data: outlier_exposure must be in [0, 10]; got -1.0"),
    ],
)
def test_out_of_range_values_are_refused_with_the_key(stage, override, message):
    from berth.finetune.config import FinetuneConfig
    from berth.pretrain.config import PretrainConfig

    cls = {"pretrain": PretrainConfig, "finetune": FinetuneConfig}[stage]
    with pytest.raises(ConfigError) as caught:
        load_config(cls, None, [override])
    assert f"<defaults>: {message}" in str(caught.value)


def test_one_name_per_idea_in_both_train_sections():
    from berth.finetune.config import FinetuneTrainConfig
    from berth.pretrain.config import PretrainTrainConfig
    from berth.runtime.config import TrainConfig

    shared = {f.name for f in dataclasses.fields(TrainConfig)}
    for stage in (PretrainTrainConfig, FinetuneTrainConfig):
        names = {f.name for f in dataclasses.fields(stage)}
        assert shared <= names and "keep_last" not in names
    assert {f.name for f in dataclasses.fields(PretrainTrainConfig)} - shared == {"eval_batches", "peak_tflops"}


SINGLE = "data.text_pair_column=b (text pairs)"
NEEDS_WINDOWS = "trains on single texts among unrelated text; it needs data.long_text=windows and no"


@pytest.mark.parametrize(
    ("dead", "live", "message"),
    [
        # (overrides that set a key the rest makes dead, the setting that brings it to life, the one line)
        (
            ["data.stride=32", "data.long_text=head"],
            ["data.stride=32"],
            "data.stride=32 does nothing with data.long_text=head (one truncated window per text)",
        ),
        (
            ["data.aggregation=max", "data.long_text=tail"],
            ["data.aggregation=max"],
            "data.aggregation=max does nothing with data.long_text=tail (one window per text)",
        ),
        (
            ["data.pooler_layers=2"],
            ["data.pooler_layers=2", "data.aggregation=hierarchical"],
            "data.pooler_layers=2 does nothing with data.aggregation=auto",
        ),
        (
            ["data.max_train_windows=4", "data.aggregation=margin"],
            ["data.max_train_windows=4", "data.aggregation=attention"],
            "data.max_train_windows=4 does nothing with data.aggregation=margin",
        ),
        (
            ["data.head_fraction=0.5", "data.long_text=head"],
            ["data.head_fraction=0.5", "data.long_text=head_tail"],
            "data.head_fraction=0.5 does nothing with data.long_text=head and no train.compare_truncation (which also "
            "tries head_tail)",
        ),
        (
            ["data.head_fraction=0.5"],
            ["data.head_fraction=0.5", "train.compare_truncation=true"],
            "data.head_fraction=0.5 does nothing with data.long_text=windows and no train.compare_truncation (which "
            "also tries head_tail)",
        ),
        (
            ["data.robustness_docs=100", "data.long_text=head"],
            ["data.robustness_docs=100"],
            "data.robustness_docs=100 does nothing with data.long_text=head",
        ),
        (
            ["data.robustness_docs=100", "data.text_pair_column=b"],
            ["data.robustness_docs=100"],
            f"data.robustness_docs=100 does nothing with {SINGLE}",
        ),
        (
            ["data.distractors=news.txt", "data.robustness_docs=0"],
            ["data.distractors=news.txt"],
            "data.distractors=news.txt does nothing with data.robustness_docs=0",
        ),
        (
            ["data.in_domain_robustness=false", "data.robustness_docs=0"],
            ["data.in_domain_robustness=false"],
            "data.in_domain_robustness=false does nothing with data.robustness_docs=0",
        ),
        (
            ["data.hidden_filler=in_domain"],
            ["data.hidden_filler=in_domain", "data.hidden_training=0.3"],
            "data.hidden_filler=in_domain does nothing with data.hidden_training=0",
        ),
        (
            ["data.outlier_text=news.txt", "data.hidden_training=0.3", "data.hidden_filler=in_domain"],
            ["data.outlier_text=news.txt", "data.hidden_training=0.3", "data.hidden_filler=both"],
            "data.outlier_text=news.txt does nothing with data.outlier_exposure=0 and data.hidden_filler=in_domain",
        ),
        (
            ["train.compare_truncation=true", "data.text_pair_column=b"],
            ["train.compare_truncation=true"],
            f"train.compare_truncation=true does nothing with {SINGLE}",
        ),
        (
            ["data.hidden_weight=0.5"],
            ["data.hidden_weight=0.5", "data.hidden_training=0.3"],
            "data.hidden_weight=0.5 does nothing with data.hidden_training=0",
        ),
        (
            ["data.outlier_text=news.txt"],
            ["data.outlier_text=news.txt", "data.outlier_exposure=0.5"],
            "data.outlier_text=news.txt does nothing with data.outlier_exposure=0 and data.hidden_training=0",
        ),
        (
            ["data.hidden_training=0.3", "data.long_text=head"],
            ["data.hidden_training=0.3"],
            f"data.hidden_training=0.3 {NEEDS_WINDOWS} data.text_pair_column (not data.long_text=head)",
        ),
        (
            ["data.outlier_exposure=0.5", "data.text_pair_column=b"],
            ["data.outlier_exposure=0.5"],
            f"data.outlier_exposure=0.5 {NEEDS_WINDOWS} data.text_pair_column (not {SINGLE})",
        ),
        (
            ["data.outlier_exposure=0.5", "data.aggregation=attention"],
            ["data.outlier_exposure=0.5"],
            "data.outlier_exposure=0.5 trains single windows towards a flat distribution; it needs a window "
            "aggregation, not attention (use data.hidden_training for the pooled ones)",
        ),
        (
            ["task=ner", "data.aggregation=max"],
            ["data.aggregation=max"],
            "data.aggregation=max does nothing with task=ner",
        ),
        (
            ["task=ner", "data.text_pair_column=b"],
            ["data.text_pair_column=b"],
            "data.text_pair_column=b does nothing with task=ner",
        ),
        (
            ["task=ner", "train.yardstick=true"],
            ["train.yardstick=true"],
            "train.yardstick=true does nothing with task=ner",
        ),
        (
            ["data.tags_column=tags"],
            ["data.tags_column=tags", "task=ner"],
            "data.tags_column=tags does nothing with task=classification",
        ),
        (
            ["hub.revision=dev"],
            ["hub.revision=dev", "hub.push=true", "hub.repo_id=a/b"],
            "hub: hub.revision=dev does nothing with hub.push=false",
        ),
        (
            ["hub.private=true", "hub.repo_id=a/b"],
            ["hub.private=true", "hub.repo_id=a/b", "hub.push=true"],
            "hub: hub.repo_id=a/b does nothing with hub.push=false",
        ),
    ],
)
def test_an_option_that_does_nothing_is_refused_and_the_setting_that_needs_it_accepts_it(dead, live, message):
    from berth.finetune.config import FinetuneConfig

    with pytest.raises(ConfigError) as caught:
        load_config(FinetuneConfig, None, dead)
    assert str(caught.value).count("\n") == 0 and str(caught.value).endswith(message)
    load_config(FinetuneConfig, None, live)  # the same key where it matters


def test_push_checkpoints_is_pretrainings_and_refused_in_fine_tuning():
    from berth.finetune.config import FinetuneConfig
    from berth.pretrain.config import PretrainConfig

    push = ["hub.push=true", "hub.repo_id=a/b", "hub.push_checkpoints=true"]
    assert load_config(PretrainConfig, None, push).hub.push_checkpoints
    with pytest.raises(ConfigError, match=r"hub.push_checkpoints=true does nothing in fine-tuning"):
        load_config(FinetuneConfig, None, push)


def test_the_shipped_configs_set_only_live_options():
    from berth.finetune.config import FinetuneConfig

    for name in ("reviews_sentiment", "peoples_daily_ner"):
        load_config(FinetuneConfig, f"configs/finetune/{name}.yaml")


@pytest.mark.parametrize(
    ("dead", "live", "message"),
    [
        (
            ["data.whole_word_mask=false", "data.word_segmenter=jieba"],
            ["data.word_segmenter=jieba"],
            "data.word_segmenter=jieba does nothing with data.whole_word_mask=false (every token is masked on its own)",
        ),
        (
            ["data.eval_fraction=0", "train.eval_batches=4"],
            ["train.eval_batches=4"],
            "train.eval_batches=4 does nothing with data.eval_fraction=0 (nothing held out)",
        ),
    ],
)
def test_a_pretraining_option_that_does_nothing_is_refused(dead, live, message):
    from berth.pretrain.config import PretrainConfig

    with pytest.raises(ConfigError) as caught:
        load_config(PretrainConfig, None, dead)
    assert str(caught.value) == f"<defaults>: config: {message}"
    load_config(PretrainConfig, None, live)
