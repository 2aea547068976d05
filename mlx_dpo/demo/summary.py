"""The before/after summary printed at the end of a demo run.

"Before" is the base model (adapters off), "after" the tuned policy, both on held-out pairs:
- preference accuracy: share of pairs with log pi(chosen) > log pi(rejected);
- DPO reward accuracy: share with beta*log(pi/pi_ref) larger for chosen (0 by definition
  before tuning, where pi == pi_ref);
- the share of sampled answers that show the preferred behaviour (the demo's rule), and a few
  sample answers side by side, same prompts and seeds.
"""

from __future__ import annotations

import numpy as np

from mlx_dpo import reference
from mlx_dpo.model import adapters_off


def demo_summary(
    loaded, valid_pairs, valid_refs, cfg, *, log=print, n_prompts=48, n_show=3
) -> dict:
    from mlx_dpo import demo

    model, tokenizer = loaded.model, loaded.tokenizer
    policy_c, policy_r = reference.pair_logps(
        model, valid_pairs, batch_size=2 * cfg.batch_size, label="evaluation"
    )
    ref_c, ref_r = valid_refs
    prompts = [p.prompt for p in valid_pairs[:n_prompts]]
    with adapters_off(model):
        before = demo.sample_answers(model, tokenizer, prompts, seed=cfg.seed)
    after = demo.sample_answers(model, tokenizer, prompts, seed=cfg.seed)
    out = {
        "preference_accuracy_before": float(np.mean(ref_c > ref_r)),
        "preference_accuracy_after": float(np.mean(policy_c > policy_r)),
        "reward_accuracy_after": float(np.mean((policy_c - ref_c) > (policy_r - ref_r))),
        "preferred_share_before": _share(before, prompts),
        "preferred_share_after": _share(after, prompts),
    }
    log("")
    log(f"Before/after on {len(valid_pairs)} held-out pairs ({len(prompts)} prompts sampled):")
    log(
        f"  preference accuracy, log p(chosen) > log p(rejected): {out['preference_accuracy_before']:6.1%} -> {out['preference_accuracy_after']:6.1%}"
    )
    log(
        f"  DPO reward accuracy (chosen reward > rejected):        {'n/a':>6} -> {out['reward_accuracy_after']:6.1%}"
    )
    log(
        f"  sampled answers with the preferred behaviour:          {out['preferred_share_before']:6.1%} -> {out['preferred_share_after']:6.1%}"
    )
    for prompt, b, a in list(zip(prompts, before, after, strict=True))[:n_show]:
        text = prompt if isinstance(prompt, str) else prompt[-1]["content"]
        log(f"  prompt: {text}")
        log(f"    before: {b.strip()}")
        log(f"    after:  {a.strip()}")
    return out


def _share(answers: list[str], prompts: list) -> float:
    from mlx_dpo import demo

    # with the prompt, an answer also has to be about the question that was asked
    return float(np.mean([demo.is_preferred(a, p) for a, p in zip(answers, prompts, strict=True)]))
