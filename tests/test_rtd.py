"""Replaced-token detection (data.objective=rtd): sampling, the collator's draws, the losses against transformers'
ELECTRA classes, packing, exports that load as the ecosystem's classes, and runs that resume exactly."""

import shutil

import pytest
import torch
from conftest import launch_two_processes
from safetensors.torch import load_file
from test_finetune_train import tiny  # noqa: F401
from test_pretrain_model import SPECIAL, VOCAB, examples
from test_pretrain_train import assert_same_weights, config, setup, weights  # noqa: F401
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    ElectraForMaskedLM,
    ElectraForPreTraining,
    ModernBertForMaskedLM,
    ModernBertModel,
    pipeline,
)

from berth.core.config import load_config
from berth.core.labels import IGNORE_INDEX
from berth.pretrain.config import DataConfig, ModelConfig, PretrainConfig, generator_shape
from berth.pretrain.masking import MaskingCollator, pack_batch, sample_buckets, sample_draw_count
from berth.pretrain.rtd import RTD_HEAD, ReplacedTokenObjective, sample_replacements
from berth.pretrain.train import pretrain
from berth.runtime.engines import tied_pairs
from berth.runtime.tracking import read_metrics

INPUTS = ("input_ids", "token_type_ids", "attention_mask", "mlm_positions", "mlm_labels", "mlm_draws")
INPUTS += ("next_sentence_label",)
PACKING = ("position_ids", "sequence_ids", "cls_positions")
IDS = {"pad": 0, "cls": 2, "sep": 3}


def collate(rows, objective="rtd"):
    return MaskingCollator(DataConfig(mask_prob=0.3, objective=objective), SPECIAL)(rows)


def objective(architecture="bert", sentence_task=True, width=0.25):
    torch.manual_seed(0)
    cfg = ModelConfig(
        architecture=architecture, size="tiny", hidden_dropout=0, attention_dropout=0, generator_width=width
    )
    return ReplacedTokenObjective(cfg, VOCAB, IDS, sentence_task, rtd_weight=50.0).eval()


def uniforms(gumbel):
    """The uniform draws whose Gumbel transform -log(-log(u)) is `gumbel`."""
    return torch.exp(-torch.exp(-torch.tensor(gumbel)))


def test_a_sample_is_the_bucket_then_the_token_with_the_highest_noisy_score():
    assert sample_buckets(4) == (2, 2) and sample_buckets(5) == (2, 3) and sample_buckets(21128) == (145, 146)
    logits = torch.tensor([[0.1, 0.2, 0.3, 0.4]]).log().expand(4, 4)  # buckets {0, 1} (mass 0.3), {2, 3} (0.7)
    draws = uniforms(
        [
            [0.0, 0.0, 0.0, 0.0],  # bucket 1 (log 0.7 > log 0.3), then token 3 (log 0.4 > log 0.3)
            [2.0, 0.0, 1.0, 0.0],  # bucket 0 (log 0.3 + 2 > log 0.7), then token 0 (log 0.1 + 1 > log 0.2)
            [2.0, 0.0, 0.0, 0.0],  # bucket 0, then token 1
            [0.0, 0.0, 0.5, 0.0],  # bucket 1, then token 2 (log 0.3 + 0.5 > log 0.4)
        ]
    )
    assert sample_replacements(logits, draws).tolist() == [3, 0, 1, 2]


def test_samples_follow_the_generators_distribution():
    probs = torch.tensor([0.02, 0.08, 0.1, 0.15, 0.25, 0.4])  # 2 buckets of 3
    n = 40_000
    draws = torch.rand(n, sample_draw_count(6), generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(sample_replacements(probs.log().expand(n, 6), draws), minlength=6).float()
    sigma = (n * probs * (1 - probs)).sqrt()
    assert ((counts - n * probs).abs() < 4 * sigma).all(), counts


def test_rounding_in_the_logits_rarely_changes_a_sample():
    """Another process count computes the generator's logits with other rounding; a discrete sample amplifies any
    difference. Gumbel-max changes a sample only at a near tie: noise of 1e-5 in the logits changes none of 4,000
    here, where an inverse-CDF draw over the 8,000 tokens (berth's first sampler) changed 3."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4000, 8000, generator=g) * 0.5
    draws = torch.rand(4000, sample_draw_count(8000), generator=g)
    noisy = logits + 1e-5 * torch.randn(logits.shape, generator=g)
    assert torch.equal(sample_replacements(logits, draws), sample_replacements(noisy, draws))


def test_rtd_masks_as_masked_lm_does_and_each_example_draws_its_own_samples():
    rows = examples(seed=1)
    rtd, mlm = collate(rows), collate(rows, objective="mlm")
    assert "mlm_draws" not in mlm
    for key in ("input_ids", "labels", "mlm_positions", "mlm_labels"):
        assert torch.equal(rtd[key], mlm[key]), key
    draws = rtd["mlm_draws"]
    assert draws.shape == (len(rtd["mlm_positions"]), sample_draw_count(VOCAB)) == (len(draws), 17 + 18)
    assert ((draws >= 0) & (draws < 1)).all()
    # an example's draws do not depend on the batch it is in
    alone = collate(rows[2:3])
    width = rtd["input_ids"].shape[1]
    of_row_2 = (rtd["mlm_positions"] // width) == 2
    assert torch.equal(alone["mlm_draws"], draws[of_row_2])


@pytest.mark.parametrize("architecture", ["bert", "modernbert"])
def test_a_packed_batch_gives_the_figures_of_the_unpacked_one(architecture):
    """Each draw must travel with its position when examples are packed, or other tokens are sampled."""
    model = objective(architecture)
    unpacked = collate(examples(seed=5, n=12))
    packed = pack_batch(unpacked, capacity=96, pad_id=0)
    assert packed["input_ids"].shape[0] < 12
    with torch.no_grad():
        a = model(**{k: unpacked[k] for k in INPUTS})
        b = model(**{k: packed[k] for k in (*INPUTS, *PACKING)})
    for key in ("mlm_loss", "rtd_loss", "nsp_loss"):
        assert torch.allclose(a[key], b[key], rtol=1e-5, atol=1e-5), key
    for key in ("rtd_replaced", "rtd_count", "rtd_found", "mlm_count"):
        assert torch.equal(a[key], b[key]), key


def test_the_losses_are_transformers_electra_losses():
    """Generator: ElectraForMaskedLM's own loss on the masked input. Discriminator: ElectraForPreTraining's own loss
    on the input with the samples in place, labelled where a sample differs from the original."""
    model = objective("bert")
    b = collate(examples(seed=3, n=8))
    with torch.no_grad():
        out = model(**{k: b[k] for k in INPUTS})
        common = {"attention_mask": b["attention_mask"], "token_type_ids": b["token_type_ids"]}
        generator = model.generator(input_ids=b["input_ids"], labels=b["labels"], **common)
        assert torch.allclose(out["mlm_loss"] / out["mlm_count"], generator.loss, atol=1e-5)
        at_masks = generator.logits.flatten(0, 1)[b["mlm_positions"], :VOCAB]  # (N, V)
        sampled = sample_replacements(at_masks, b["mlm_draws"])
        original = torch.where(b["labels"] != IGNORE_INDEX, b["labels"], b["input_ids"]).flatten()
        replaced = original.clone()
        replaced[b["mlm_positions"]] = sampled
        labels = (replaced != original).long().view_as(b["input_ids"])
        discriminator = model.discriminator(input_ids=replaced.view_as(b["input_ids"]), labels=labels, **common)
    assert torch.allclose(out["rtd_loss"] / out["rtd_count"], discriminator.loss, atol=1e-6)
    # the loop divides each term by its targets: ELECTRA's mean MLM loss + 50 x mean BCE, plus the [CLS] task's
    means = model.loss_terms(out) / model.targets(b)
    expected = [generator.loss, 50 * discriminator.loss, out["nsp_loss"] / 8]
    assert torch.allclose(means, torch.stack(expected), atol=1e-5)
    assert out["rtd_replaced"] == labels.sum() > 0
    assert out["rtd_count"] == b["attention_mask"].sum()
    # the samples are the generator's, not the [MASK]ed input: most differ from it and from the original
    assert (sampled != b["input_ids"].flatten()[b["mlm_positions"]]).float().mean() > 0.5


def test_the_generator_is_narrower_and_shares_the_token_embeddings():
    assert generator_shape(ModelConfig(size="mini")) == (64, 1)
    assert generator_shape(ModelConfig(size="base", generator_width=1 / 3)) == (256, 4)
    assert generator_shape(ModelConfig(size="mini", generator_width=1 / 3)) == (86, 1)  # even head width
    bert, modern = objective("bert"), objective("modernbert")
    shared = bert.discriminator.electra.embeddings.word_embeddings.weight
    for name, param in bert.discriminator.electra.embeddings.named_parameters():
        assert bert.generator.electra.embeddings.get_parameter(name) is param, name
    assert bert.generator.generator_lm_head.weight is shared
    assert bert.generator.config.hidden_size == 32 and bert.generator.config.embedding_size == 128
    assert modern.generator.embedding.shared_weight is modern.discriminator.embeddings.tok_embeddings.weight
    for model in (bert, modern):
        assert (model.generator_bias[VOCAB:] == -1e4).all()
    # shared matrices are tied parameters (one tensor under two names), which every engine saves and loads
    assert sorted(name for name, _ in tied_pairs(bert)) == [
        "generator.electra.embeddings.LayerNorm.bias",
        "generator.electra.embeddings.LayerNorm.weight",
        "generator.electra.embeddings.position_embeddings.weight",
        "generator.electra.embeddings.token_type_embeddings.weight",
        "generator.electra.embeddings.word_embeddings.weight",
        "generator.generator_lm_head.weight",
    ]
    assert [name for name, _ in tied_pairs(modern)] == ["generator.model.embeddings.tok_embeddings.shared_weight"]


def test_the_modernbert_export_computes_what_training_computed(tmp_path):
    """The generator's exported embedding matrix is the product of the shared matrix and the projection: the
    exported ModernBertForMaskedLM gives the training logits, and the exported body with rtd_head.safetensors
    the discriminator's scores."""
    from safetensors.torch import save_file

    from berth.pretrain.rtd import DiscriminatorHead

    model = objective("modernbert")
    with torch.no_grad():  # move every weight off its initial value (zero biases would hide a lost one)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    b = collate(examples(seed=4))
    parts = {part.folder: part for part in model.exports(model.state_dict())}
    for folder, part in parts.items():
        part.model.save_pretrained(tmp_path / folder, state_dict=part.weights)
        for name, tensors in part.extra.items():
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / folder / name)
    generator, info = ModernBertForMaskedLM.from_pretrained(tmp_path / "generator", output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"]), info
    with torch.no_grad():
        expected = model.generator_logits(
            b["input_ids"], b["token_type_ids"], b["attention_mask"], b["mlm_positions"], None, None
        )
        logits = generator.eval()(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        assert torch.allclose(logits.flatten(0, 1)[b["mlm_positions"], :VOCAB], expected, atol=1e-4)

        body = ModernBertModel.from_pretrained(tmp_path).eval()
        head = DiscriminatorHead(body.config.hidden_size)
        head.load_state_dict(load_file(tmp_path / RTD_HEAD))
        ids = b["input_ids"]
        ours = model.rtd_head(model.discriminator(input_ids=ids, attention_mask=b["attention_mask"])[0])
        theirs = head(body(input_ids=ids, attention_mask=b["attention_mask"])[0])
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert set(load_file(tmp_path / "sentence_head.safetensors")) == {
        "dense.weight",
        "dense.bias",
        "classifier.weight",
        "classifier.bias",
    }


def test_settings_that_do_nothing_or_cannot_work_are_refused():
    with pytest.raises(ValueError, match=r"rtd_weight=10\.0 does nothing with objective=mlm"):
        DataConfig(rtd_weight=10.0)
    with pytest.raises(ValueError, match=r"generator_width=0\.5 does nothing with data\.objective=mlm"):
        PretrainConfig(model=ModelConfig(generator_width=0.5))
    with pytest.raises(ValueError, match="generator_width must be in"):
        ModelConfig(generator_width=1.5)
    with pytest.raises(ValueError, match=r"model\.init with data\.objective=rtd"):
        PretrainConfig(data=DataConfig(objective="rtd"), model=ModelConfig(init="runs/x/final"))
    with pytest.raises(ValueError, match="rtd_weight must be above 0"):
        DataConfig(objective="rtd", rtd_weight=0.0)


# -- runs ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def electra(setup):  # noqa: F811
    cfg = config(setup, "rtd-bert", "data.objective=rtd")
    return cfg, pretrain(cfg)


def test_an_rtd_run_exports_electra_classes_that_load_with_no_missing_key(electra):
    _, final = electra
    _, info = ElectraForPreTraining.from_pretrained(final, output_loading_info=True)
    assert not any(info.values()), info
    assert type(AutoModel.from_pretrained(final)).__name__ == "ElectraModel"
    _, info = AutoModelForSequenceClassification.from_pretrained(final, num_labels=3, output_loading_info=True)
    assert info["missing_keys"] and all(k.startswith("classifier.") for k in info["missing_keys"]), info
    generator, info = ElectraForMaskedLM.from_pretrained(final / "generator", output_loading_info=True)
    assert not any(info.values()), info
    assert generator.config.hidden_size == 32 and generator.config.embedding_size == 128
    predictions = pipeline("fill-mask", model=str(final / "generator"))("中国[MASK]民")
    assert len(predictions) == 5 and all(p["token_str"] not in ("[PAD]", "[CLS]") for p in predictions)
    # the generator's exported embeddings are the discriminator's, bit for bit
    discriminator = load_file(str(final / "model.safetensors"))
    key = "electra.embeddings.word_embeddings.weight"
    assert torch.equal(load_file(str(final / "generator" / "model.safetensors"))[key], discriminator[key])
    assert (final / "sentence_head.safetensors").is_file()
    card = (final / "README.md").read_text()
    assert "replaced-token detection" in card and 'pipeline_tag: "feature-extraction"' in card
    assert 'pipeline_tag: "fill-mask"' in (final / "generator" / "README.md").read_text()

    metrics = read_metrics(final.parent)
    train = [m for m in metrics if "loss" in m]
    evals = [m for m in metrics if "eval_rtd_accuracy" in m]
    assert [m["step"] for m in evals] == [4, 8]
    for m in train:
        assert {"mlm_loss", "rtd_loss", "rtd_accuracy", "rtd_recall", "rtd_replaced", "nsp_loss"} <= set(m)
        assert 0 < m["rtd_replaced"] < 0.3  # masked positions only (15% of words), less those sampled right


def test_a_resumed_rtd_run_ends_with_the_same_weights(setup, electra):  # noqa: F811
    _, final = electra
    root, _ = setup
    resumed = root / "rtd-resumed"
    shutil.copytree(final.parent, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000008")
    shutil.rmtree(resumed / "final")
    pretrain(config(setup, resumed.name, "data.objective=rtd", "train.resume=auto"))
    assert_same_weights(weights(final.parent), weights(resumed))
    for name in ("generator/model.safetensors", "sentence_head.safetensors"):
        assert_same_weights(*(load_file(str(d / "final" / name)) for d in (final.parent, resumed)))
    logged = [m for m in read_metrics(resumed) if "loss" in m]
    assert [m["step"] for m in logged] == [2, 4, 6, 8] and all(m["lr"] > 0 for m in logged[1:3])


def test_modernbert_rtd_trains_and_exports_a_discriminator_and_a_fill_mask_generator(setup):  # noqa: F811
    final = pretrain(config(setup, "rtd-modern", "data.objective=rtd", "model.architecture=modernbert"))
    body, info = AutoModel.from_pretrained(final, output_loading_info=True)
    assert type(body).__name__ == "ModernBertModel" and not any(info.values()), info
    assert set(load_file(str(final / RTD_HEAD))) == {"dense.weight", "dense.bias"} | {
        "dense_prediction.weight",
        "dense_prediction.bias",
    }
    assert len(pipeline("fill-mask", model=str(final / "generator"))("中国[MASK]民")) == 5


@pytest.mark.slow
def test_two_processes_reach_the_rtd_weights_of_one(setup):  # noqa: F811
    """Replacements come from each example's own draws: with the global RNG (the same seed on every process) the
    2-process run samples other tokens and this fails."""
    common = ["data.objective=rtd", "model.hidden_dropout=0", "model.attention_dropout=0", "train.max_steps=3"]
    common += ["train.log_every=1", "train.eval_every=2", "train.save_every=100"]
    one = pretrain(config(setup, "rtd-procs1", *common))
    root, base = setup
    two = root / "rtd-procs2"
    args = ["configs/pretrain/mini_zh.yaml", *base, f"output_dir={two}", *common, "train.batch_size=4"]
    result = launch_two_processes("pretrain", args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_weights(weights(one.parent), weights(two), atol=1e-5)
    figures = [[m["rtd_loss"] for m in read_metrics(d) if "rtd_loss" in m] for d in (one.parent, two)]
    assert len(figures[0]) == 3 and figures[0] == pytest.approx(figures[1], rel=1e-5)


def test_the_laptop_recipe_accepts_rtd():
    cfg = load_config(PretrainConfig, "configs/pretrain/mini_zh.yaml", ["data.objective=rtd"])
    assert cfg.data.objective == "rtd" and cfg.model.generator_width == 0.25


def test_berth_finetune_trains_the_discriminator_of_an_rtd_export(electra, tiny):  # noqa: F811
    """The shipped sentiment recipe (hidden-text training, margin) and NER, from the ELECTRA export."""
    import json

    from test_finetune_train import ner_config, review_config

    from berth.finetune.train import finetune

    _, export = electra
    for name, make in (("reviews", review_config), ("ner", ner_config)):
        overrides = [f"model.init={export}"]
        if name == "reviews":
            overrides += ["data.aggregation=margin", "data.hidden_training=0.3", "data.hidden_weight=0.75"]
        final = finetune(make(tiny, tiny / f"rtd-{name}", *overrides))
        config = json.loads((final / "config.json").read_text())
        assert config["model_type"] == "electra", name
        assert config["architectures"][0] in ("ElectraForSequenceClassification", "ElectraForTokenClassification")
        results = json.loads((final.parent / "eval_results.json").read_text())
        assert "test" in results, name
