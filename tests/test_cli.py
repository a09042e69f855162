import json
import os
import socket
import subprocess
import sys

import pytest
import yaml

from berth.app.cli import main
from berth.core import hub


@pytest.fixture
def tiny_corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(
        "".join(f"第{i}个句子，含有一些中文字符。 sentence number {i}\n" for i in range(200)), encoding="utf-8"
    )
    return path


def test_tokenizer_train_command(tmp_path, tiny_corpus, capsys):
    out = tmp_path / "tok"
    code = main(
        [
            "tokenizer",
            "train",
            "configs/tokenizer/en_uncased.yaml",
            f"corpus.sources=[{tiny_corpus}]",
            f"output_dir={out}",
            "tokenizer.vocab_size=300",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert f"tokenizer saved to {out}" in printed
    assert "[UNK] rate" in printed and "tokens per char" in printed
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["tokenizer"]["vocab_size"] == 300
    assert saved["corpus"]["sources"] == [str(tiny_corpus)]
    assert (out / "vocab.txt").is_file()


def test_print_config_shows_the_resolved_config(capsys):
    assert main(["tokenizer", "train", "configs/tokenizer/zh.yaml", "tokenizer.vocab_size=123", "--print-config"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["tokenizer"]["vocab_size"] == 123
    assert resolved["corpus"]["sources"] == ["peoples_daily:train", "reviews_sentiment:train"]


def test_bad_key_is_one_line_on_stderr(capsys):
    code = main(["tokenizer", "train", "configs/tokenizer/zh.yaml", "tokenizer.vocab=5"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1
    assert err.startswith("berth: error: configs/tokenizer/zh.yaml: unknown key 'tokenizer.vocab'")
    assert "unknown key 'tokenizer.vocab'" in err and "valid keys in section 'tokenizer': vocab_size" in err


def test_missing_corpus_is_one_line_on_stderr(tmp_path, capsys):
    code = main(["tokenizer", "train", "configs/tokenizer/en_uncased.yaml", f"output_dir={tmp_path / 'o'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err == (
        "berth: error: corpus source 'data/*.txt': no such file, directory or glob match (embedded corpora are: "
        "peoples_daily, peoples_daily:train, peoples_daily_words, peoples_daily_words:train, "
        "peoples_daily_paragraphs, reviews_sentiment, reviews_sentiment:train, reviews_sentiment:validation, "
        "reviews_sentiment:test; hub datasets are written hf:OWNER/NAME)\n"
    )
    assert not (tmp_path / "o").exists()


def test_python_dash_m_berth_is_the_same_command():
    result = subprocess.run(
        [sys.executable, "-m", "berth", "tokenizer", "train", "configs/tokenizer/zh.yaml", "--print-config"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert yaml.safe_load(result.stdout)["output_dir"] == "runs/tokenizer/zh"


def test_unreachable_hub_switches_the_libraries_offline(monkeypatch):
    monkeypatch.setattr(hub, "_unreachable_at_start", [])
    for var in hub.OFFLINE_VARS:
        monkeypatch.delenv(var, raising=False)
    with socket.socket() as s:  # a loopback port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    assert hub.configure_offline_mode() is True
    assert all(os.environ[var] == "1" for var in hub.OFFLINE_VARS)
    with pytest.raises(
        hub.BerthError, match=rf"needs the Hugging Face Hub, but http://127.0.0.1:{port} is unreachable"
    ):
        hub.require_hub("pushing")


def test_reachable_hub_stays_online(monkeypatch):
    for var in hub.OFFLINE_VARS:
        monkeypatch.delenv(var, raising=False)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert hub.configure_offline_mode() is False
    assert not hub.offline_requested()


@pytest.mark.slow
def test_quick_demo_runs_every_stage_writes_the_report_then_reuses(tmp_path, capsys, caplog):
    caplog.set_level("INFO")
    assert main(["demo", "--quick", "--output-dir", str(tmp_path)]) == 0
    first = capsys.readouterr().out
    assert f"tokenizer saved to {tmp_path / 'tokenizer'}" in first
    assert f"prepared data in {tmp_path / 'cache'}" in first
    assert "Held-out masked-token accuracy during pretraining:\n  step    15:" in first
    assert "| Sentiment, TF-IDF + logistic regression yardstick |" in first
    assert "test reviews at the end of 3-8 windows of news (most decided window; alone: " in first
    report = (tmp_path / "report.md").read_text()
    for plot in (
        "pretraining",
        "lr_schedule",
        "finetuning",
        "confusion_matrix",
        "long_reviews",
        "pretrained_vs_scratch",
        "robustness",
    ):
        assert (tmp_path / "plots" / f"{plot}.png").stat().st_size > 1000
        assert f"plots/{plot}.png" in report
    for run in ("sentiment", "sentiment_scratch", "ner", "ner_scratch"):
        assert (tmp_path / run / "final" / "model.safetensors").is_file()
    assert "berth finetune configs/finetune/peoples_daily_ner.yaml" in report
    assert "trained with `data.hidden_training=0.3` and `data.hidden_weight=0.75`" in report  # the shipped config's
    # the exported aggregation's row: the reviews alone, then per evaluation (news, in-domain) each position and
    # the reviews at the end scored from their own windows only
    evaluated = json.loads((tmp_path / "sentiment" / "eval_results.json").read_text())
    assert evaluated["robustness_in_domain"]["source"] == "validation sentences left undecided"
    cells = [evaluated["robustness"]["alone"]["margin"]]
    for key in ("robustness", "robustness_in_domain"):
        found = evaluated[key]
        cells += [found["accuracy"][place]["margin"] for place in ("start", "middle", "end")]
        cells.append(found["text_windows_only"]["end"]["margin"])
    [row] = [line for line in report.splitlines() if line.startswith("| most decided window (exported) |")]
    assert row == "| most decided window (exported) | " + " | ".join(f"{100 * v:.1f}%" for v in cells) + " |"
    assert "test reviews at the end of 3-8 windows of in-domain neutral sentences (most decided window" in first
    assert "building every stage" in report and "reusing" not in report
    # where the minutes went: one row per stage, in order
    section = report.split("## Where the time went")[1].split("\n## ")[0]
    timed = [line.split(" | ")[0] for line in section.splitlines() if line.startswith("| ")]
    stages = ["tokenizer", "prepare", "pretrain", *(f"finetune {r}" for r in ("sentiment", "sentiment_scratch"))]
    stages += ["finetune ner", "finetune ner_scratch"]
    assert timed == ["| stage", *(f"| {n} {name}" for n, name in enumerate(stages, start=1))]
    assert main(["demo", "--quick", "--output-dir", str(tmp_path)]) == 0
    again = (tmp_path / "report.md").read_text()
    reuse = "reusing tokenizer, pretraining, sentiment, sentiment_scratch, ner, ner_scratch (built earlier with"
    assert reuse in " ".join(again.split())
    second = capsys.readouterr().out
    assert second.split("Report:")[0].split("  time")[0] == first.split("Report:")[0].split("  time")[0]
    assert "reusing the tokenizer" in caplog.text
    assert "reusing tokenized documents" in caplog.text
    assert "reusing the pretrained model" in caplog.text
    assert f"reusing {tmp_path / 'ner_scratch' / 'final'}" in caplog.text


def test_a_fine_tuning_run_is_stale_once_its_encoder_is_retrained(tmp_path):
    from berth.app.demo import built_with
    from berth.core.config import dump_config, load_config
    from berth.finetune.config import FinetuneConfig

    cfg = load_config(FinetuneConfig, "configs/finetune/reviews_sentiment.yaml", [f"output_dir={tmp_path / 'ft'}"])
    run, encoder = tmp_path / "ft", tmp_path / "pretrain" / "final" / "model.safetensors"
    encoder.parent.mkdir(parents=True)
    encoder.write_bytes(b"weights")
    assert not built_with(run, cfg, encoder)  # nothing built yet
    (run / "final").mkdir(parents=True)
    (run / "final" / "config.json").write_text("{}")
    (run / "config.yaml").write_text(dump_config(cfg))
    os.utime(encoder, (1000, 1000))
    assert built_with(run, cfg, encoder) and built_with(run, cfg)
    other = load_config(
        FinetuneConfig, "configs/finetune/reviews_sentiment.yaml", [f"output_dir={run}", "train.lr=1e-5"]
    )
    assert not built_with(run, other, encoder)  # another config
    os.utime(encoder)  # the encoder retrained after the fine-tuning run
    assert not built_with(run, cfg, encoder) and built_with(run, cfg)


@pytest.mark.parametrize(
    ("module", "config", "key"),
    [
        ("pretrain", "configs/pretrain/mini_zh.yaml", ("model", "size", "mini")),
        pytest.param(
            "finetune", "configs/finetune/peoples_daily_ner.yaml", ("task", None, "ner"), marks=pytest.mark.slow
        ),
    ],
)
def test_python_dash_m_stage_prints_its_config(module, config, key):
    result = subprocess.run(
        [sys.executable, "-m", "berth", module, config, "train.max_steps=7", "--print-config"],
        capture_output=True,
        text=True,
        check=True,
    )
    resolved = yaml.safe_load(result.stdout)
    assert resolved["train"]["max_steps"] == 7
    section, name, value = key
    assert (resolved[section][name] if name else resolved[section]) == value


def test_print_config_refuses_an_option_that_does_nothing(capsys):
    # the shipped sentiment config weighs hidden-text training; turning the training off leaves the weight dead
    args = ["finetune", "configs/finetune/reviews_sentiment.yaml", "data.hidden_training=0", "--print-config"]
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.endswith("data.hidden_weight=0.75 does nothing with data.hidden_training=0\n")
    assert main([*args[:-1], "data.hidden_weight=1", "--print-config"]) == 0
