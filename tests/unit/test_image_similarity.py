"""DINO / CLIP-I / CLIP-T scores: exact aggregation, tiny encoders offline, clear errors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import to_tensor

from genlab.metrics.image_similarity import (
    ClipImageTextScorer,
    DinoImageEncoder,
    ImagePreprocess,
    ReferenceFeatures,
    SubjectFidelity,
    mean_reference_similarity,
    paired_similarity,
    remove_identifier,
    subject_fidelity_from_features,
)
from genlab.pretrained import WeightsUnavailableError
from tests.conftest import shared_path

BACKPACK = [f"{i:02d}.jpg" for i in range(6)]


@pytest.fixture(scope="module")
def dino() -> DinoImageEncoder:
    return DinoImageEncoder(pretrained=None, tiny=True)


@pytest.fixture(scope="module")
def clip() -> ClipImageTextScorer:
    return ClipImageTextScorer(pretrained=None, tiny=True)


def _gradient(w: int = 200, h: int = 160) -> Image.Image:
    """Smooth colour ramps."""
    y, x = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    rgb = torch.stack([x, y, 1 - x * y]).mul(255).round().byte()
    return Image.fromarray(rgb.permute(1, 2, 0).numpy())


def _checker(w: int = 240, h: int = 300, cell: int = 12) -> Image.Image:
    """Saturated, high-frequency black/red-white squares: nothing like the ramps."""
    y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    on = ((x // cell + y // cell) % 2).bool()
    rgb = torch.zeros(3, h, w, dtype=torch.uint8)
    rgb[0] = 255
    rgb[1][on] = 255
    rgb[2][on] = 255
    return Image.fromarray(rgb.permute(1, 2, 0).numpy())


def _uint8(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


# --------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a photo of sksToy toy on the beach", "a photo of toy on the beach"),
        ("sksToy toy in the snow", "toy in the snow"),
        ("a  photo of   sksToy  toy ", "a photo of toy"),
        ("a sksToy, on a table.", "a, on a table."),
        ("a photo of sksToys and sksToy", "a photo of sksToys and"),
        ("a photo of a toy", "a photo of a toy"),
        ("SKSTOY toy", "SKSTOY toy"),
        ("sksToy", ""),
    ],
)
def test_remove_identifier_exact_strings(prompt: str, expected: str) -> None:
    assert remove_identifier(prompt, "sksToy") == expected


def test_remove_identifier_none_only_collapses_spaces() -> None:
    assert remove_identifier("  a  sks   dog ", None) == "a sks dog"
    assert remove_identifier("a sks dog", "") == "a sks dog"
    assert remove_identifier("a sks dog (sks)", "sks") == "a dog ( )"


def test_aggregation_matches_hand_computation() -> None:
    prompts = ["p a", "p a", "p b"]
    dino_img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    dino_ref = torch.tensor([[1.0, 0.0], [3.0, 4.0]])  # the second is (0.6, 0.8) once normalised
    clip_img = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    clip_ref = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    clip_txt = torch.tensor([[1.0, 1.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, 5.0]])

    r2 = math.sqrt(2.0)
    dino_per = [(1.0 + 0.6) / 2, (0.0 + 0.8) / 2, (1 / r2 + 1.4 / r2) / 2]
    clip_i_per = [1.0, 0.0, 0.0]
    clip_t_per = [1 / r2, -1.0, 1.0]

    torch.testing.assert_close(
        mean_reference_similarity(dino_img, dino_ref), torch.tensor(dino_per, dtype=torch.float64)
    )
    torch.testing.assert_close(
        paired_similarity(clip_img, clip_txt), torch.tensor(clip_t_per, dtype=torch.float64)
    )

    s = subject_fidelity_from_features(prompts, dino_img, dino_ref, clip_img, clip_ref, clip_txt)
    assert s.dino == pytest.approx(sum(dino_per) / 3, abs=1e-12)
    assert s.clip_i == pytest.approx(sum(clip_i_per) / 3, abs=1e-12)
    assert s.clip_t == pytest.approx(sum(clip_t_per) / 3, abs=1e-12)
    assert list(s.per_prompt) == ["p a", "p b"]
    a, b = s.per_prompt["p a"], s.per_prompt["p b"]
    assert a["dino"] == pytest.approx((0.8 + 0.4) / 2, abs=1e-12)
    assert a["clip_i"] == pytest.approx(0.5, abs=1e-12)
    assert a["clip_t"] == pytest.approx((1 / r2 - 1) / 2, abs=1e-12)
    assert a["num_images"] == 2
    assert b == pytest.approx(
        {"dino": 1.2 / r2, "clip_i": 0.0, "clip_t": 1.0, "num_images": 1}, abs=1e-12
    )
    assert (s.num_images, s.num_references) == (3, 2)
    d = s.as_dict()
    assert {"dino", "clip_i", "clip_t", "per_prompt"} <= set(d)
    assert d["per_prompt"]["p b"]["clip_t"] == pytest.approx(1.0)


def test_aggregation_errors() -> None:
    f2, f3 = torch.ones(2, 4), torch.ones(3, 4)
    with pytest.raises(ValueError, match="no generated images"):
        subject_fidelity_from_features([], f2[:0], f2, f2[:0], f2, f2[:0])
    with pytest.raises(ValueError, match="no reference images"):
        subject_fidelity_from_features(["a", "b"], f2, f2[:0], f2, f2[:0], f2)
    with pytest.raises(ValueError, match="3 prompts but 2 rows"):
        subject_fidelity_from_features(["a", "b", "c"], f2, f2, f3, f2, f3)
    with pytest.raises(ValueError, match="2 DINO reference features but 3 CLIP"):
        subject_fidelity_from_features(["a", "b"], f2, f2, f2, f3, f2)
    with pytest.raises(TypeError, match="list of strings"):
        subject_fidelity_from_features("ab", f2, f2, f2, f2, f2)


# --------------------------------------------------------------------------------------------
# Tiny encoders
# --------------------------------------------------------------------------------------------


def test_features_are_unit_norm_deterministic_and_frozen(
    dino: DinoImageEncoder, clip: ClipImageTextScorer
) -> None:
    images = [_gradient(), _checker(), _gradient(64, 300)]
    rng_before = torch.random.get_rng_state()
    dino2, clip2 = (
        DinoImageEncoder(pretrained=None, tiny=True),
        ClipImageTextScorer(tiny=True, pretrained=None),
    )
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # building leaves the RNG alone
    for a, b in ((dino, dino2), (clip, clip2)):
        fa, fb = a.encode_images(images), b.encode_images(images)
        assert fa.shape == (3, a.feature_dim) and fa.dtype == torch.float32
        torch.testing.assert_close(fa.norm(dim=1), torch.ones(3), atol=1e-5, rtol=0)
        torch.testing.assert_close(fa, fb, atol=0, rtol=0)
        assert not fa.requires_grad
        assert all(not p.requires_grad for p in a.parameters())
        a.train()
        assert not a.training and not a.model.training
    text = clip.text_features(["a photo of toy", "a dog", ""])
    assert text.shape == (3, clip.feature_dim)
    torch.testing.assert_close(text.norm(dim=1), torch.ones(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(text, clip2.text_features(["a photo of toy", "a dog", ""]))
    assert not torch.allclose(text[0], text[1])


def test_pil_tensor_and_file_inputs_give_the_same_features(
    dino: DinoImageEncoder, clip: ClipImageTextScorer, tmp_path: Path
) -> None:
    pils = [_gradient(), _checker(), _gradient(64, 300)]
    tensors = [to_tensor(p) for p in pils]
    files = []
    for i, p in enumerate(pils):
        files.append(tmp_path / f"{i}.png")
        p.save(files[-1])
    same_size = torch.stack(
        [to_tensor(_gradient()), to_tensor(_gradient().transpose(Image.Transpose.FLIP_LEFT_RIGHT))]
    )
    for enc in (dino, clip):
        from_pil = enc.encode_images(pils)
        torch.testing.assert_close(enc.encode_images(tensors), from_pil, atol=1e-6, rtol=0)
        torch.testing.assert_close(enc.encode_images(files), from_pil, atol=1e-6, rtol=0)
        torch.testing.assert_close(
            enc.encode_images(same_size),
            enc.encode_images(
                [_gradient(), _gradient().transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
            ),
            atol=1e-6,
            rtol=0,
        )
        # batching does not change the features
        torch.testing.assert_close(
            enc.encode_images(pils, batch_size=1), from_pil, atol=1e-5, rtol=0
        )
    # uint8 tensors and RGBA / grayscale images are accepted
    torch.testing.assert_close(
        dino.encode_images([_uint8(pils[0])]), dino.encode_images(pils[:1]), atol=1e-6, rtol=0
    )
    assert dino.encode_images([pils[0].convert("RGBA"), pils[0].convert("L")]).shape == (2, 64)


def test_bad_image_inputs_fail_clearly(dino: DinoImageEncoder) -> None:
    x = torch.rand(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"expected values in \[0,1\].*\(x \+ 1\) / 2"):
        dino.encode_images(x * 2 - 1)
    with pytest.raises(ValueError, match=r"\(B,3,H,W\)"):
        dino.encode_images(x[0])
    with pytest.raises(TypeError, match="not a single image"):
        dino.encode_images(_gradient())
    with pytest.raises(TypeError, match="image 1: expected a PIL image"):
        dino.encode_images([_gradient(), 3])
    assert dino.encode_images([]).shape == (0, dino.feature_dim)


def test_preprocess_geometry() -> None:
    white = torch.ones(1, 3, 50, 100)  # h=50, w=100
    norm = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
    longest = ImagePreprocess(size=(64, 64), resize_mode="longest", **norm)(white)[0]
    assert longest.shape == (3, 64, 64)
    assert longest[:, 16:48].min() > 1 - 1e-5  # the image, resized to 64x32, centred
    assert longest[:, :16].abs().max() == 0 and longest[:, 48:].abs().max() == 0  # padding
    squash = ImagePreprocess(size=(32, 48), resize_mode="squash", **norm)(white)
    assert squash.shape == (1, 3, 32, 48) and torch.allclose(squash, torch.ones_like(squash))
    ramp = torch.linspace(0, 1, 100).expand(1, 3, 50, 100)  # left-right ramp: the crop is central
    short = ImagePreprocess(size=(50, 50), **norm)(ramp)[0]
    torch.testing.assert_close(short, ramp[0, :, :, 25:75])
    with pytest.raises(ValueError, match="crop_pct"):
        ImagePreprocess(size=(8, 8), crop_pct=1.5)


def test_tiny_with_pretrained_is_refused() -> None:
    with pytest.raises(ValueError, match="pretrained=null"):
        DinoImageEncoder(pretrained="hub", tiny=True)
    with pytest.raises(ValueError, match="pretrained=null"):
        ClipImageTextScorer(pretrained="openai", tiny=True)
    with pytest.raises(ValueError, match="unknown open_clip model"):
        ClipImageTextScorer("ViT-Q-99", pretrained="openai")
    with pytest.raises(ValueError, match="unknown timm model"):
        DinoImageEncoder("vit_nonexistent_patch16", pretrained="hub")


# --------------------------------------------------------------------------------------------
# The metric on the tiny encoders
# --------------------------------------------------------------------------------------------


def test_identical_images_score_one_and_different_lower(
    dino: DinoImageEncoder, clip: ClipImageTextScorer
) -> None:
    metric = SubjectFidelity(dino, clip, identifier="sksToy", batch_size=2)
    ref = [_gradient()]
    same = metric([_gradient(), _gradient()], ["a sksToy toy", "a sksToy toy on a beach"], ref)
    assert same.dino == pytest.approx(1.0, abs=1e-5)
    assert same.clip_i == pytest.approx(1.0, abs=1e-5)
    other = metric([_checker()], ["a sksToy toy"], ref)
    assert other.dino < same.dino - 1e-3 and other.clip_i < same.clip_i - 1e-3
    assert -1 <= other.dino <= 1 and -1 <= other.clip_i <= 1
    for enc in (dino, clip):
        a, b = enc.encode_images([_gradient(), _checker()])
        assert float(a @ b) < float(a @ a) - 1e-3


def test_subject_fidelity_end_to_end(dino: DinoImageEncoder, clip: ClipImageTextScorer) -> None:
    metric = SubjectFidelity(dino, clip, identifier="sksToy", batch_size=2)
    images = torch.stack([to_tensor(_gradient()), to_tensor(_checker(200, 160))] * 2)
    prompts = ["a photo of sksToy toy on the beach", "sksToy toy in the snow"] * 2
    refs = [_gradient(300, 300), _checker(), _gradient(90, 200)]
    scores = metric(images, prompts, refs)

    # the same numbers by hand from the encoders
    gen_d, ref_d = dino.encode_images(images), dino.encode_images(refs)
    gen_c, ref_c = clip.image_features(images), clip.image_features(refs)
    txt = clip.text_features(["a photo of toy on the beach", "toy in the snow"] * 2)
    assert scores.dino == pytest.approx((gen_d @ ref_d.T).mean().item(), abs=1e-5)
    assert scores.clip_i == pytest.approx((gen_c @ ref_c.T).mean().item(), abs=1e-5)
    assert scores.clip_t == pytest.approx((gen_c * txt).sum(1).mean().item(), abs=1e-5)
    beach = scores.per_prompt[prompts[0]]
    assert beach["num_images"] == 2
    assert beach["clip_t"] == pytest.approx(float(gen_c[0] @ txt[0]), abs=1e-5)
    assert beach["dino"] == pytest.approx((gen_d[0] @ ref_d.T).mean().item(), abs=1e-5)
    torch.testing.assert_close(
        clip(images[:2], ["a photo of toy on the beach", "toy in the snow"]),
        (gen_c[:2] * txt[:2]).sum(1).double(),
        atol=1e-5,
        rtol=0,
    )
    assert metric.clip_t_prompts(prompts[:2]) == ["a photo of toy on the beach", "toy in the snow"]


def test_reference_features_are_cached_by_identity(
    dino: DinoImageEncoder, clip: ClipImageTextScorer, monkeypatch: pytest.MonkeyPatch
) -> None:
    metric = SubjectFidelity(dino, clip, identifier="sksToy")
    calls = []
    encode = DinoImageEncoder.encode_images

    def counting(self, images, batch_size=None):
        calls.append(len(images))
        return encode(self, images, batch_size)

    monkeypatch.setattr(DinoImageEncoder, "encode_images", counting)
    refs = [_gradient(), _checker()]
    first = metric([_gradient()], ["sksToy toy"], refs)
    second = metric([_gradient()], ["sksToy toy"], refs)
    assert calls == [2, 1, 1]  # references once, generated images each time
    assert second == first
    metric([_gradient()], ["sksToy toy"], list(refs))  # an equal but different list: re-encoded
    assert calls[-2:] == [2, 1]
    feats = metric.reference_features(refs)
    assert isinstance(feats, ReferenceFeatures) and len(feats) == 2
    calls.clear()
    assert metric([_gradient()], ["sksToy toy"], feats) == first
    assert calls == [1]


def test_metric_errors(dino: DinoImageEncoder, clip: ClipImageTextScorer) -> None:
    metric = SubjectFidelity(dino, clip)
    img = [_gradient()]
    with pytest.raises(ValueError, match="no reference images"):
        metric(img, ["a"], [])
    with pytest.raises(ValueError, match="no generated images"):
        metric([], [], img)
    with pytest.raises(ValueError, match="2 generated images but 1 prompts"):
        metric(img * 2, ["a"], img)
    with pytest.raises(ValueError, match="1 generated images but 2 prompts"):
        metric(torch.rand(1, 3, 8, 8), ["a", "b"], img)
    with pytest.raises(TypeError, match="one per image"):
        metric(img, "a", img)
    with pytest.raises(ValueError, match="no reference images"):
        ReferenceFeatures(torch.zeros(0, 4), torch.zeros(0, 4))


# --------------------------------------------------------------------------------------------
# Real weights: clear errors offline, local files
# --------------------------------------------------------------------------------------------


def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    # what HF_HUB_OFFLINE=1 in the environment does (read once, at import)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_missing_dino_weights_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    _offline(monkeypatch)
    with pytest.raises(WeightsUnavailableError) as info:
        DinoImageEncoder("vit_small_patch16_224.dino", pretrained="hub")
    msg = str(info.value)
    assert "'hub'" in msg and "metrics.dino.pretrained=" in msg and "metrics.dino.tiny=true" in msg
    assert "\n" not in msg
    with pytest.raises(WeightsUnavailableError, match=r"no such file.*eval\.dino\.pretrained="):
        DinoImageEncoder(
            pretrained="/nonexistent/dino.safetensors", config_key="eval.dino.pretrained"
        )


def test_missing_clip_weights_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    _offline(monkeypatch)
    with pytest.raises(WeightsUnavailableError) as info:
        ClipImageTextScorer("ViT-B-32", pretrained="laion2b_s34b_b79k")
    msg = str(info.value)
    assert "laion2b_s34b_b79k" in msg and "metrics.clip.pretrained=" in msg
    assert "\n" not in msg


def test_dino_loads_a_local_weights_file(tmp_path: Path) -> None:
    import timm
    from safetensors.torch import save_file

    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0)
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    path = tmp_path / "vit_tiny.safetensors"
    save_file(state, str(path))
    enc = DinoImageEncoder("vit_tiny_patch16_224", pretrained=str(path))
    loaded = enc.model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert enc.preprocess.size == (224, 224) and enc.feature_dim == 192


# --------------------------------------------------------------------------------------------
# Real photos (../shared/testdata)
# --------------------------------------------------------------------------------------------


def test_real_photos_on_tiny_encoders(
    shared_testdata: Path, dino: DinoImageEncoder, clip: ClipImageTextScorer
) -> None:
    paths = [shared_path(shared_testdata, "dreambooth_backpack", name) for name in BACKPACK]
    metric = SubjectFidelity(dino, clip, identifier="sks", batch_size=4)
    itself = metric(paths[:1], ["a sks backpack"], paths[:1])
    assert itself.dino == pytest.approx(1.0, abs=1e-5)
    assert itself.clip_i == pytest.approx(1.0, abs=1e-5)
    across = metric(paths[3:], ["a sks backpack"] * 3, paths[:3])
    for value in (across.dino, across.clip_i, across.clip_t):
        assert math.isfinite(value) and -1 <= value <= 1
    assert across.dino < 1 - 1e-4 and across.num_references == 3


def test_preprocessing_matches_timm_and_open_clip_transforms(
    shared_testdata: Path, dino: DinoImageEncoder, clip: ClipImageTextScorer
) -> None:
    """Our tensor resize/crop/normalise agrees with the libraries' own PIL eval transforms."""
    import open_clip
    import timm
    from open_clip.transform import PreprocessCfg, image_transform_v2

    photo = Image.open(shared_path(shared_testdata, "dreambooth_backpack", "00.jpg"))
    photo = photo.convert("RGB")
    timm_tf = timm.data.create_transform(
        input_size=(3, 224, 224),
        interpolation="bicubic",
        crop_pct=0.9,
        mean=dino.preprocess.mean,
        std=dino.preprocess.std,
    )
    clip_tf = image_transform_v2(
        PreprocessCfg(**open_clip.get_model_preprocess_cfg(clip.model)), is_train=False
    )
    for img in (photo, photo.crop((0, 0, 700, 400)), photo.crop((0, 0, 300, 700))):
        for enc, tf in ((dino, timm_tf), (clip, clip_tf)):
            ours = enc.preprocess([to_tensor(img)])[0]
            theirs = tf(img)
            assert ours.shape == theirs.shape == (3, 224, 224)
            assert (ours - theirs).abs().mean() < 0.01
