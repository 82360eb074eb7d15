"""Pretrained transformer backbones (--pretrained) in every method file: text data and its views, the encoder's
features, the input pipeline, USB's fine-tuning optimiser, the defaults, the errors, and a few steps of every method
with a tiny random BERT and ViT saved as Hugging Face folders (no download)."""

import functools
import json
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import (error_of, full_and_resumed, load_algorithm, records, write_image_folder, write_text_data,
                      write_tiny_bert, write_tiny_vit)

pytest.importorskip("transformers")
METHODS = ["fixmatch", "meta_t", "meta_semi", "freematch", "layermatch"]


@pytest.fixture(scope="module")
def fixmatch():
    return load_algorithm("fixmatch")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrained")
    return {"bert": write_tiny_bert(root / "bert"), "vit": write_tiny_vit(root / "vit"), "text": write_text_data(root / "text"),
            "usb": write_text_data(root / "usb", usb=True), "images": write_image_folder(root / "images")}


def text_flags(folders, tmp_path, *extra, name="run"):
    return ["--dataset", "text", "--data-dir", str(folders["text"]), "--pretrained", str(folders["bert"]), "--labels", "4",
            "--total-steps", "4", "--lr-warmup", "1", "--eval-every", "2", "--log-every", "2", "--workers", "0",
            "--output-dir", str(tmp_path / name), *extra]


def vit_flags(folders, tmp_path, *extra, name="run"):
    return ["--dataset", "folder", "--data-dir", str(folders["images"]), "--image-size", "8", "--pretrained",
            str(folders["vit"]), "--labels", "8", "--total-steps", "4", "--lr-warmup", "1", "--eval-every", "2",
            "--log-every", "2", "--workers", "0", "--output-dir", str(tmp_path / name), *extra]


# --- every method, both backbones ---
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("backbone", ["text", "vit"])
def test_every_method_trains_with_both_backbones(method, backbone, folders, tmp_path):
    algorithm = load_algorithm(method)
    argv = (text_flags if backbone == "text" else vit_flags)(folders, tmp_path, "--lr", "1e-3")
    summary = algorithm.train(algorithm.parse_args(argv))
    assert summary["finished"] and 0 <= summary["top1"] <= 1
    train = [r for r in records(tmp_path / "run") if r["kind"] == "train"]
    assert len(train) == 2 and all(math.isfinite(r["loss"]) for r in train)
    # AdamW's warm-up (1 step, from 0) then cosine over the 3 steps left: steps 2 and 4 train at these
    assert train[0]["lr"] == pytest.approx(1e-3) and train[1]["lr"] == pytest.approx(1e-3 * math.cos(7 * math.pi * 2 / (16 * 3)))
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert any(k.startswith("features.encoder.") for k in ckpt["model"])


@pytest.mark.parametrize("mode", ["jvp", "exact", "fd"])
def test_meta_t_meta_gradients_run_through_a_transformer(mode, folders, tmp_path):
    """A transformer's fused attention has no forward mode (jvp) and no double backward (exact) on the CPU: meta steps
    use the math kernel. The TGN moves in each mode."""
    meta_t = load_algorithm("meta_t")
    for argv in (text_flags(folders, tmp_path, "--meta-grad", mode), vit_flags(folders, tmp_path, "--meta-grad", mode, name="vit")):
        meta_t.train(meta_t.parse_args(argv))
        out = argv[argv.index("--output-dir") + 1]
        assert all(r["tgn_grad_norm"] > 0 for r in records(out) if r["kind"] == "train")


def test_meta_t_jvp_equals_the_double_backward_through_bert(folders):
    """The forward-mode meta-gradient is the exact one through attention and LayerNorm too (float64, dropout replayed)."""
    meta_t = load_algorithm("meta_t")
    encoder = meta_t.load_encoder(folders["bert"])
    torch.manual_seed(0)
    model = meta_t.make_model(None, encoder, 0, 2).double().train()
    b, mu = 2, 2
    x = torch.randint(5, 20, (b * (1 + 2 * mu), 7))
    x[1, 4:] = -1  # a shorter text: padding inside the batch
    tgn = meta_t.make_tgn(2, 8).double()
    args = meta_t.parse_args(["--batch-size", str(b), "--uratio", str(mu)])
    forward_rng = meta_t.rng_state(x.device)
    with meta_t.differentiable_attention():
        logits = model(x)
    probs_w = logits[b:-b * mu].detach().softmax(1)
    step = dict(logits_us=logits[-b * mu:], probs_w=probs_w, pbar=meta_t.class_confidence(probs_w)[0], x_l=x[:b],
                y_l=torch.tensor([0, 1]), inputs=x, alpha=0.3, forward_rng=forward_rng)
    after_forward = torch.get_rng_state()

    def tgn_gradient(mode):
        args.meta_grad = mode
        torch.set_rng_state(after_forward)
        with meta_t.differentiable_attention():
            return torch.cat([g.flatten() for g in meta_t.meta_gradient(model, tgn, **step, args=args)[0]])

    exact = tgn_gradient("exact")
    assert exact.abs().max() > 1e-8 and torch.allclose(tgn_gradient("jvp"), exact, rtol=1e-6, atol=1e-14)


def test_resume_is_bitwise_with_a_text_encoder(folders, tmp_path):
    layermatch = load_algorithm("layermatch")
    argv = lambda name, *extra: text_flags(folders, tmp_path, "--total-steps", "6", *extra, name=name)
    full, resumed, ckpt_full, ckpt_cut = full_and_resumed(layermatch, argv, stop_after=3)
    assert resumed["steps"] == 6 and resumed["top1"] == full["top1"]
    for part in ("model", "avg_head"):
        for k, v in ckpt_full[part].items():
            assert torch.equal(v, ckpt_cut[part][k]), (part, k)
    assert ckpt_full["optimizer"]["state"].keys() == ckpt_cut["optimizer"]["state"].keys()


# --- defaults and errors ---
def test_pretrained_sets_usbs_fine_tuning_defaults_each_overridable(fixmatch, folders):
    text = fixmatch.parse_args(["--dataset", "text", "--pretrained", str(folders["bert"])])
    assert (text.optimizer, text.lr, text.layer_decay, text.batch_size, text.uratio, text.ema, text.weight_decay,
            text.lr_warmup, text.total_steps) == ("adamw", 5e-5, 0.75, 8, 1, 0.0, 5e-4, 5120, 102_400)
    image = fixmatch.parse_args(["--dataset", "cifar100", "--pretrained", str(folders["vit"]), "--lr", "1e-4", "--layer-decay", "0.65"])
    assert (image.optimizer, image.lr, image.layer_decay, image.total_steps, image.net) == ("adamw", 1e-4, 0.65, 204_800, "")
    scratch = fixmatch.parse_args(["--dataset", "cifar10"])
    assert (scratch.optimizer, scratch.lr, scratch.batch_size, scratch.net) == ("sgd", 0.03, 64, "wrn28_2")
    assert fixmatch.parse_args(["--dataset", "text", "--pretrained", "x", "--optimizer", "sgd", "--ema", "0.999"]).ema == 0.999
    meta_t, meta_semi = load_algorithm("meta_t"), load_algorithm("meta_semi")
    assert meta_t.parse_args(["--dataset", "text", "--pretrained", "x"]).tgn_hidden == 1000  # the paper's, for text
    assert meta_t.parse_args(["--dataset", "cifar10", "--pretrained", "x"]).tgn_hidden == 100
    assert meta_t.parse_args(["--dataset", "text", "--pretrained", "x"]).uratio == 1
    assert not meta_semi.parse_args(["--dataset", "text", "--pretrained", "x"]).mixup
    assert meta_semi.parse_args(["--dataset", "cifar10", "--pretrained", "x"]).mixup


@pytest.mark.parametrize("method", METHODS)
def test_bad_pretrained_input_gets_one_line(method, folders, tmp_path):
    algorithm = load_algorithm(method)
    text = lambda *extra: text_flags(folders, tmp_path, *extra)
    assert "needs --pretrained" in error_of(algorithm, ["--dataset", "text", "--data-dir", str(folders["text"])])
    assert "no config.json" in error_of(algorithm, text("--pretrained", str(tmp_path)))
    assert "choose one network" in error_of(algorithm, text("--net", "cnn_small"))
    assert "holds an image encoder" in error_of(algorithm, text("--pretrained", str(folders["vit"])))
    assert "holds a text encoder" in error_of(algorithm, vit_flags(folders, tmp_path, "--pretrained", str(folders["bert"])))
    if method == "meta_semi":
        assert "texts (token ids) do not mix" in error_of(algorithm, text("--mixup"))


def test_a_folder_without_weights_or_of_another_kind_gets_one_line(fixmatch, folders, tmp_path):
    import transformers

    (tmp_path / "config_only").mkdir()
    (tmp_path / "config_only" / "config.json").write_text((folders["bert"] / "config.json").read_text())
    assert "cannot load the model" in error_of(fixmatch, text_flags(folders, tmp_path, "--pretrained", str(tmp_path / "config_only")))
    speech = transformers.Wav2Vec2Config(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
                                         conv_dim=(8,), conv_kernel=(3,), conv_stride=(2,), num_conv_pos_embeddings=4,
                                         num_conv_pos_embedding_groups=2)
    transformers.Wav2Vec2Model(speech).save_pretrained(tmp_path / "speech")
    msg = error_of(fixmatch, text_flags(folders, tmp_path, "--pretrained", str(tmp_path / "speech")))
    assert "reads input_values" in msg and "supported are" in msg
    (tmp_path / "vit_bare").mkdir()
    for f in ("config.json", "model.safetensors"):
        (tmp_path / "vit_bare" / f).write_bytes((folders["vit"] / f).read_bytes())
    assert "no readable preprocessor_config.json" in error_of(fixmatch, vit_flags(folders, tmp_path, "--pretrained", str(tmp_path / "vit_bare")))


# --- text data and views ---
def test_text_files_labels_and_views(fixmatch, folders, tmp_path):
    tokenizer = fixmatch.load_encoder(folders["bert"])["tokenizer"]
    train_x, train_y, test_x, test_y, classes = fixmatch.load_text(folders["text"], tokenizer, 6)
    assert classes == 2 and train_x.shape[:2] == (96, 1) and train_x.shape[2] == 6 and test_x.shape[:2] == (32, 1)
    assert set(train_y) == {0, 1}  # "great" < "other"
    first = json.loads((folders["text"] / "train.jsonl").read_text().splitlines()[0])
    ids = tokenizer(first["text"], truncation=True, max_length=6)["input_ids"]
    assert tokenizer.unk_token_id not in ids  # the tiny tokenizer knows the data's words
    assert train_x[0, 0].tolist() == ids + [-1] * (6 - len(ids)) and train_y[0] == ["great", "other"].index(first["label"])
    usb = fixmatch.load_text(folders["usb"], tokenizer, 32)[0]
    assert usb.shape[1] == 3  # ori, aug_0, aug_1
    # USB ships train.json / test.json objects, integer labels as strings
    d = tmp_path / "usb_json"
    d.mkdir()
    for split in ("train", "test"):
        lines = (folders["usb"] / f"{split}.jsonl").read_text().splitlines()
        entries = {str(i): {**(e := json.loads(l)), "label": str(["great", "other"].index(e["label"]))} for i, l in enumerate(lines)}
        (d / f"{split}.json").write_text(json.dumps(entries))
    x, y, _, _, classes = fixmatch.load_text(d, tokenizer, 32)
    assert classes == 2 and np.array_equal(x, usb) and y.dtype.kind == "i"


@pytest.mark.parametrize("content, message", [
    (None, "no train.jsonl"),
    ('{"text": "good", "label": "a"}\nnot json\n', "is not JSON lines"),
    ('{"label": "a"}\n', 'needs a "text"'),
    ('{"ori": "good", "aug_0": "fine", "aug_1": "nice", "label": "a"}\n{"text": "bad", "label": "b"}\n', "some entries have"),
    ('{"text": "good", "label": "a"}\n{"text": "bad", "label": 1}\n', "all names or all integers"),
    ('{"text": "good", "label": 0}\n{"text": "bad", "label": -1}\n', "count from 0"),
    ('{"text": "good", "label": ["a"]}\n', "a name or an integer"),
])
def test_bad_text_files_get_one_line(fixmatch, folders, tmp_path, content, message):
    if content is not None:
        (tmp_path / "train.jsonl").write_text(content)
    test_label = 0 if '"label": 0' in (content or "") else "a"
    (tmp_path / "test.jsonl").write_text(json.dumps({"text": "good", "label": test_label}) + "\n")
    argv = text_flags(folders, tmp_path, "--labels", "2", name="out")
    argv[argv.index("--data-dir") + 1] = str(tmp_path)
    assert message in error_of(fixmatch, argv)


def test_a_test_label_that_no_training_text_has(fixmatch, folders, tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "good", "label": "a"}\n{"text": "bad", "label": "b"}\n')
    (tmp_path / "test.jsonl").write_text('{"text": "meh", "label": "c"}\n')
    with pytest.raises(fixmatch.UserError, match="no training text has"):
        fixmatch.load_text(tmp_path, fixmatch.load_encoder(folders["bert"])["tokenizer"], 8)


def test_strong_text_view(fixmatch, folders):
    tokenizer = fixmatch.load_encoder(folders["bert"])["tokenizer"]
    special = frozenset(tokenizer.all_special_ids)
    strong = functools.partial(fixmatch.strong_text, special_ids=special, mask_id=tokenizer.mask_token_id)
    ids = tokenizer("good food the dog was very tasty this box", max_length=16, truncation=True)["input_ids"]
    x = np.full((1, 16), -1, np.int32)
    x[0, :len(ids)] = ids
    views = [strong(x, random.Random(seed)) for seed in range(40)]
    assert all(np.array_equal(strong(x, random.Random(seed)), v) for seed, v in enumerate(views))  # a function of the rng
    for v in views:
        kept = v[v >= 0].tolist()
        assert kept[0] == tokenizer.cls_token_id and kept[-1] == tokenizer.sep_token_id and len(kept) > 2
        assert np.all(v[len(kept):] == -1) and len(kept) <= len(ids)
    assert sum(not np.array_equal(v, x[0]) for v in views) >= 38
    assert any(tokenizer.mask_token_id in v for v in views) and any((v >= 0).sum() < len(ids) for v in views)
    assert np.array_equal(fixmatch.weak_text(x, random.Random(0)), x[0])
    # USB's format: the strong view is one of the back-translations, both drawn
    usb = np.stack([x[0], x[0] + 100, x[0] + 200])
    picked = {int(strong(usb, random.Random(seed))[1]) for seed in range(20)}
    assert picked == {ids[1] + 100, ids[1] + 200}


# --- features, inputs, optimiser ---
def test_text_features_ignore_padding_and_images_read_the_cls_token(fixmatch, folders):
    encoder = fixmatch.load_encoder(folders["bert"])
    model = fixmatch.make_model(None, encoder, 0, 2).eval()
    x = torch.tensor([[2, 7, 9, 11, 3], [2, 8, 3, -1, -1]])
    with torch.no_grad():
        short, padded = model.features(x[1:, :3]), model.features(torch.cat([x[1:], torch.full((1, 4), -1)], 1))
        assert torch.allclose(short, padded, atol=1e-6)
        hidden = encoder["model"](input_ids=x[1:, :3]).last_hidden_state
        assert torch.allclose(short, hidden.mean(1), atol=1e-6)
    vit = fixmatch.load_encoder(folders["vit"])
    model = fixmatch.make_model(None, vit, 3, 4).eval()
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model.features(images), vit["model"](pixel_values=images).last_hidden_state[:, 0])
    assert model.head.out_features == 4 and vit["model"].pooler is None  # unused parameters: none


def test_input_pipeline_resizes_and_normalises_as_the_image_processor(fixmatch, folders):
    vit = fixmatch.load_encoder(folders["vit"])
    assert vit["size"] == (16, 16) and vit["mean"] == [0.5, 0.4, 0.3]
    args = fixmatch.parse_args(["--dataset", "mnist", "--pretrained", "x"])
    prepare = fixmatch.input_pipeline(args, (0.1,), (0.3,), vit, torch.device("cpu"))
    grey = torch.randint(0, 256, (2, 8, 8, 1), dtype=torch.uint8)
    out = prepare(grey)
    assert out.shape == (2, 3, 16, 16)
    big = F.interpolate(grey.permute(0, 3, 1, 2).float() / 255, size=(16, 16), mode="bilinear", antialias=True)
    for c, (m, s) in enumerate(zip(vit["mean"], vit["std"])):
        assert torch.allclose(out[:, c], (big[:, 0] - m) / s, atol=1e-6)
    text = fixmatch.input_pipeline(fixmatch.parse_args(["--dataset", "text", "--pretrained", "x"]), None, None, None, torch.device("cpu"))
    ids = torch.tensor([[[2, 5, 3, -1, -1, -1], [9, 9, 9, 9, 9, 9]], [[2, 5, 6, 3, -1, -1], [9] * 6]], dtype=torch.int32)
    assert text(ids).tolist() == [[2, 5, 3, -1], [2, 5, 6, 3]] and text(ids).dtype == torch.long  # stored views: the original
    joined = fixmatch.join([text(ids[:1]), text(ids)])
    assert joined.tolist() == [[2, 5, 3, -1], [2, 5, 3, -1], [2, 5, 6, 3]]


def test_adamw_layer_decay_weight_decay_and_schedule(fixmatch, folders):
    encoder = fixmatch.load_encoder(folders["bert"])
    model = fixmatch.make_model(None, encoder, 0, 2)
    args = fixmatch.parse_args(["--dataset", "text", "--pretrained", "x", "--lr", "0.1", "--layer-decay", "0.5",
                                "--lr-warmup", "10", "--total-steps", "110", "--weight-decay", "0.01"])
    optimizer, scheduler = fixmatch.make_adamw(model, args)
    lr_of = {id(p): (g["initial_lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    # 2 blocks: embeddings at depth 0 (0.5^3), block l at l + 1, the final rest and the head at 3 (the lr itself)
    assert lr_of[id(named["features.encoder.embeddings.word_embeddings.weight"])] == (0.1 * 0.5**3, 0.01)
    assert lr_of[id(named["features.encoder.encoder.layer.0.attention.self.query.weight"])] == (0.1 * 0.5**2, 0.01)
    assert lr_of[id(named["features.encoder.encoder.layer.1.output.dense.weight"])] == (0.1 * 0.5, 0.01)
    assert lr_of[id(named["features.encoder.encoder.layer.1.output.LayerNorm.weight"])] == (0.1 * 0.5, 0.0)
    assert lr_of[id(named["head.weight"])] == (0.1, 0.01) and lr_of[id(named["head.bias"])] == (0.1, 0.0)
    assert optimizer.param_groups[0]["params"][0] is named["head.weight"] and len(lr_of) == len(named)
    lrs = []
    for _ in range(110):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == 0 and lrs[5] == pytest.approx(0.05) and lrs[10] == pytest.approx(0.1)
    assert lrs[60] == pytest.approx(0.1 * math.cos(7 * math.pi * 50 / (16 * 100)))
    # a network from scratch: one lr (no blocks), AdamW all the same
    scratch = fixmatch.NETS["cnn_small"](1, 3)
    optimizer, _ = fixmatch.make_adamw(scratch, fixmatch.parse_args(["--optimizer", "adamw", "--layer-decay", "0.5"]))
    assert {g["initial_lr"] for g in optimizer.param_groups} == {0.03}
