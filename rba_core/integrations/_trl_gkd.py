"""RbaGKDTrainer: trl.experimental.gkd.GKDTrainer with rba's fused divergence.

Import it as ``from rba_core.integrations.trl import RbaGKDTrainer``; it lives apart because
importing trl.experimental warns about unstable APIs, which GRPO and distillation users need
not see.
"""
from __future__ import annotations

from typing import Any

import torch
from trl.experimental.gkd import GKDTrainer
from trl.models.utils import _ForwardRedirection

from rba_core.integrations.trl import (
    _bound_arguments, _causal_lm, _check_teacher_and_student, _distill_sum, _last_hidden,
    _refuse_if,
)


class RbaGKDTrainer(GKDTrainer):
    """GKDTrainer whose generalized JSD is fused_linear_distill_loss, with no [tokens x vocab]
    logits for the student or the teacher.

    Same constructor and GKDConfig. Honoured: beta (0 forward KL, 1 reverse KL, else
    generalized JSD), lmbda and seq_kd (on-policy and teacher generations, TRL's), the
    num_items_in_batch normalisation. Like TRL's GKDTrainer, the divergence is taken at
    temperature 1: GKDConfig.temperature is the sampling temperature. Evaluation reports the
    loss only. Refused with UnsupportedOption: compute_metrics and
    preprocess_logits_for_metrics (no logits exist to hand them), LM heads with a bias,
    soft-capped or scaled logits, FSDP and DeepSpeed ZeRO-3.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        bound = _bound_arguments(GKDTrainer.__init__, self, args, kwargs)
        name = type(self).__name__
        for option in ("compute_metrics", "preprocess_logits_for_metrics"):
            _refuse_if(bound.get(option) is not None, name, option,
                       "the fused loss produces no logits to hand it")
        super().__init__(*args, **kwargs)
        _check_teacher_and_student(name, self)
        self._forward_redirection = _ForwardRedirection()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise ValueError(f"{type(self).__name__} computes its loss without logits, so it has "
                             "no outputs to return; call compute_loss(return_outputs=False)")
        # Through the wrapper's forward, so DDP prepares its gradient reduction.
        unwrapped = self.accelerator.unwrap_model(model)
        return self._forward_redirection(model, unwrapped, self._divergence_loss, unwrapped,
                                         inputs, num_items_in_batch)

    def _divergence_loss(self, unwrapped_student, inputs, num_items_in_batch):
        """GKDTrainer.compute_loss's loss: every next-token position whose label is not -100."""
        student = _causal_lm(unwrapped_student)
        teacher = _causal_lm(self.accelerator.unwrap_model(self.teacher_model))
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        student_hidden = _last_hidden(student, input_ids, attention_mask)
        self.teacher_model.eval()
        with torch.no_grad():
            teacher_hidden = _last_hidden(teacher, input_ids, attention_mask)
        mask = inputs["labels"][:, 1:] != -100
        total = _distill_sum(student_hidden, student.get_output_embeddings().weight,
                             teacher_hidden, teacher.get_output_embeddings().weight, mask,
                             self.beta, 1.0)
        if num_items_in_batch is not None:
            return total / torch.as_tensor(num_items_in_batch, device=total.device)
        return total / mask.sum().clamp(min=1)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # transformers' prediction_step asks compute_loss for logits; there are none.
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.mean().detach(), None, None
