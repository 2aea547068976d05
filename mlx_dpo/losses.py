"""DPO loss family. OWNED BY HELPER A (issue 2) — interface stub, to be implemented.

dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps=None,
         reference_rejected_logps=None, *, beta=0.1, loss_type="sigmoid" | list[str],
         loss_weights=None, label_smoothing=0.0, reference_free=False,
         f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, discopop_tau=0.05,
         chosen_lengths=None, rejected_lengths=None, ...) -> DPOOutput
DPOOutput: .loss (scalar), .losses (B,), .chosen_rewards (B,), .rejected_rewards (B,)
LOSSES: dict[str, callable]   # the registry; keys are the accepted loss_type names
dpo_metrics(output, policy_chosen_logps, policy_rejected_logps) -> dict[str, mx.array]
    keys: rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins,
          logps/chosen, logps/rejected (batch means, mx scalars; accuracies per example, strict >)
"""
