"""Text encoders: offline bag-of-words is meaningful, empty prompt is zero, CLIP fails clearly offline."""

from __future__ import annotations

import pytest
import torch

from genlab.nn.text import ClipTextEncoder, HashedBagOfWordsEncoder
from genlab.pretrained import WeightsUnavailableError


def test_hashed_bow_shares_words_and_is_deterministic() -> None:
    enc = HashedBagOfWordsEncoder(embed_dim=64, seed=0)
    e = enc(["a large sphere", "a small sphere", "a large box", ""])
    assert e.shape == (4, 64)
    assert torch.allclose(e[:3].norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.count_nonzero(e[3]) == 0  # no prompt -> zero condition
    sim = e @ e.T
    assert sim[0, 1] > sim[1, 2]  # "small sphere" is nearer "large sphere" than "large box"
    again = HashedBagOfWordsEncoder(embed_dim=64, seed=0)(["a large sphere"])
    assert torch.equal(again[0], e[0])
    other = HashedBagOfWordsEncoder(embed_dim=64, seed=1)(["a large sphere"])
    assert not torch.allclose(other[0], e[0])


def test_hashed_bow_has_no_weights_in_state_dict_and_cannot_train() -> None:
    enc = HashedBagOfWordsEncoder(embed_dim=16)
    assert dict(enc.state_dict()) == {}
    enc.train()
    assert not enc.training
    with pytest.raises(TypeError, match="list of strings"):
        enc("a sphere")


def test_clip_random_weights_builds_and_encodes() -> None:
    enc = ClipTextEncoder("ViT-B-32", pretrained=None, embed_dim=512)
    e = enc(["a chair", ""])
    assert e.shape == (2, 512)
    assert abs(e[0].norm().item() - 1) < 1e-4 and torch.count_nonzero(e[1]) == 0
    assert all(not p.requires_grad for p in enc.parameters())


def test_clip_missing_weights_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    # what HF_HUB_OFFLINE=1 in the environment does (read once, at import)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsUnavailableError) as info:
        ClipTextEncoder("ViT-B-32", pretrained="laion2b_s34b_b79k")
    msg = str(info.value)
    assert "laion2b_s34b_b79k" in msg and "model.text_encoder.pretrained=" in msg
    assert "\n" not in msg


def test_clip_loads_a_local_checkpoint_file(tmp_path) -> None:
    import open_clip

    reference = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    path = tmp_path / "clip_vit_b32.pt"
    torch.save(reference.state_dict(), path)
    enc = ClipTextEncoder("ViT-B-32", pretrained=str(path), embed_dim=512)
    tokens = open_clip.get_tokenizer("ViT-B-32")(["a red chair"])
    with torch.no_grad():
        expected = reference.encode_text(tokens)
    expected = expected / expected.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(enc(["a red chair"]), expected, rtol=1e-4, atol=1e-5)
