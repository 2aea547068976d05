"""A tiny Hugging Face checkpoint loaded by transformers (torch) and by mlx-lm gives the same
per-sequence completion log-probs on the same pairs, and the same DPO loss."""

import numpy as np
import pytest
from tiny import make_cfg, write_pairs

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from torch_reference import batch_logps, dpo_loss  # noqa: E402

from mlx_dpo import model as model_lib  # noqa: E402
from mlx_dpo import reference  # noqa: E402
from mlx_dpo.losses import dpo_loss as mlx_dpo_loss  # noqa: E402
from mlx_dpo.run import load_pairs  # noqa: E402


def torch_logps(hf, pairs, completion):
    out = []
    for p in pairs:
        ids = p.prompt_ids + getattr(p, completion)
        labels = [-100] * len(p.prompt_ids) + getattr(p, completion)
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits.double()
        out.append(batch_logps(logits, torch.tensor([labels])).item())
    return np.array(out)


@pytest.mark.parametrize("fixture", ["tiny_model_path", "tiny_llama_path"])
def test_sequence_logps_and_loss_match_transformers(fixture, request, tmp_path):
    path = request.getfixturevalue(fixture)
    write_pairs(tmp_path / "d.jsonl", 12)
    cfg = make_cfg(path, tmp_path / "d.jsonl", tmp_path / "run")
    loaded = model_lib.load(str(path))
    pairs, _ = load_pairs(cfg, loaded.tokenizer, lambda *_: None)
    ours_c, ours_r = reference.pair_logps(loaded.model, pairs, batch_size=4)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32)
    hf.eval()
    theirs_c, theirs_r = (
        torch_logps(hf, pairs, "chosen_ids"),
        torch_logps(hf, pairs, "rejected_ids"),
    )
    # float32 sums of ~100 token log-probs from two frameworks: round-off ~1e-4 relative
    np.testing.assert_allclose(ours_c, theirs_c, rtol=2e-4, atol=2e-3)
    np.testing.assert_allclose(ours_r, theirs_r, rtol=2e-4, atol=2e-3)
    # the DPO loss on policy = ours, reference = theirs shifted, against the torch reference
    ref_c, ref_r = theirs_c - 0.5, theirs_r + 0.3
    ours = mlx_dpo_loss(ours_c, ours_r, ref_c, ref_r, beta=0.1).loss.item()
    t = [torch.tensor(x, dtype=torch.float64) for x in (theirs_c, theirs_r, ref_c, ref_r)]
    theirs = dpo_loss(*t, beta=0.1)
    theirs = (theirs[0] if isinstance(theirs, tuple) else theirs.loss).mean().item()
    assert ours == pytest.approx(theirs, rel=1e-4)
