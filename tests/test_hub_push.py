"""Publishing through huggingface_hub against a loopback server standing in for the hub."""

import json

import pytest
from conftest import HUB_TOKEN as TOKEN
from transformers import BertConfig, BertForMaskedLM

from berth.app.cli import main


@pytest.fixture
def model_dir(zh_tokenizer_dir, tmp_path):
    from berth.core.vocab import load_tokenizer

    _, _, tokenizer_dir = zh_tokenizer_dir
    out = tmp_path / "final"
    config = BertConfig(
        vocab_size=8064, hidden_size=16, num_hidden_layers=1, num_attention_heads=1, intermediate_size=32
    )
    BertForMaskedLM(config).save_pretrained(out)
    load_tokenizer(tokenizer_dir).save_pretrained(out)
    (out / "README.md").write_text('---\nlanguage: ["zh"]\nlicense: "apache-2.0"\n---\n# test\n')
    return out


def run(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_push_uploads_the_folder_to_a_branch_of_a_private_repo(fake_hub, model_dir, monkeypatch, capsys, caplog):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    code, output = run(
        ["push", str(model_dir), "--repo-id", "alice/berth-mini", "--revision", "step-5", "--private"], capsys
    )
    assert code == 0, output
    (commit,) = fake_hub.commits
    assert commit["repo"] == "alice/berth-mini" and commit["revision"] == "step-5"
    assert commit["files"] == {p.name: p.read_bytes() for p in model_dir.iterdir()}
    create = next(r for r in fake_hub.requests if r["path"] == "/api/repos/create")
    body = json.loads(create["body"])
    assert body["name"] == "berth-mini" and body["organization"] == "alice" and body["visibility"] == "private"
    assert any(r["path"] == "/api/models/alice/berth-mini/branch/step-5" for r in fake_hub.requests)
    # the token travels in the Authorization header and nowhere else
    assert all(
        r["headers"].get("authorization", r["headers"].get("Authorization")) == f"Bearer {TOKEN}"
        for r in fake_hub.requests
        if r["method"] == "POST"
    )
    assert TOKEN not in output and TOKEN not in caplog.text


def test_push_without_a_token_stops_before_any_upload(fake_hub, model_dir, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    code, output = run(["push", str(model_dir), "--repo-id", "alice/berth-mini"], capsys)
    assert code == 2
    assert "berth: error: pushing to alice/berth-mini needs a Hugging Face token: set HF_TOKEN" in output
    assert not [r for r in fake_hub.requests if r["method"] == "POST"]


def test_push_offline_says_so_in_one_line(model_dir, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    code, output = run(["push", str(model_dir), "--repo-id", "alice/berth-mini"], capsys)  # conftest: offline
    assert code == 2
    lines = [line for line in output.splitlines() if line.strip()]
    assert lines == [
        "berth: error: pushing to alice/berth-mini needs the Hugging Face Hub, but offline mode is set "
        "(HF_HUB_OFFLINE, HF_DATASETS_OFFLINE, TRANSFORMERS_OFFLINE); use local files instead"
    ]


def test_the_offline_message_names_the_switch_that_is_set(model_dir, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var)
    code, output = run(["push", str(model_dir), "--repo-id", "alice/berth-mini"], capsys)  # TRANSFORMERS_OFFLINE
    assert code == 2
    assert "but offline mode is set (TRANSFORMERS_OFFLINE); use local files instead" in output


def test_push_refuses_a_directory_that_is_not_a_model(fake_hub, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    code, output = run(["push", str(tmp_path), "--repo-id", "alice/berth-mini"], capsys)
    assert code == 2 and "not a model directory (no config.json)" in output
    assert not fake_hub.commits
