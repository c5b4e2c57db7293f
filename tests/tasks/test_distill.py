"""SFT and KD losses (rba_core/tasks/distill.py) on a tiny random SpeechLM: each overfits a
fixed batch with only the adapter trainable, fused equals unfused, SFT is the response NLL, the
teacher is the LLM on the transcript with LoRA off, and bad options are refused."""
from __future__ import annotations

import pytest
import torch

from helpers import tiny_speechlm, write_dataset, write_tiny_llm
from rba_core.data.speech import SpeechDataset
from rba_core.tasks.distill import kd_loss, sft_loss
from rba_core.models.lora import LoraConfig, lora_modules
from rba_core.models.llama import LlamaForCausalLM


def _train(slm, loss_fn, steps: int, lr: float) -> list[float]:
    optimizer = torch.optim.Adam(slm.trainable_parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss, metrics = loss_fn()
        assert metrics["loss"] == pytest.approx(float(loss.detach()))
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def test_sft_overfits_a_fixed_batch(slm_and_batch):
    slm, batch = slm_and_batch
    losses = _train(slm, lambda: sft_loss(slm, batch), steps=60, lr=1e-2)
    assert losses[-1] < 0.3 * losses[0], losses[::10]


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_kd_overfits_a_fixed_batch(slm_and_batch, kind):
    slm, batch = slm_and_batch
    teacher, _ = slm.load_teacher()
    losses = _train(slm, lambda: kd_loss(slm, teacher, batch, kind=kind), steps=40, lr=1e-2)
    assert losses[-1] < 0.4 * losses[0], losses[::10]


def test_fused_losses_equal_the_unfused_reference(slm_and_batch):
    slm, batch = slm_and_batch
    teacher, _ = slm.load_teacher()
    for fn in (lambda fused: sft_loss(slm, batch, fused=fused),
               lambda fused: kd_loss(slm, teacher, batch, kind="jsd", temperature=1.5,
                                     fused=fused),
               lambda fused: kd_loss(slm, teacher, batch, reduction="sum", fused=fused)):
        results = []
        for fused in (True, False):
            slm.zero_grad()
            loss, _ = fn(fused)
            loss.backward()
            results.append((loss.detach(), slm.adapter.linear_1.weight.grad.clone()))
        torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-3, atol=1e-6)


def test_sft_loss_is_the_response_nll(slm_and_batch):
    slm, batch = slm_and_batch
    loss, metrics = sft_loss(slm, batch)
    # Independent: full logits over each row's own unpadded sequence.
    nll, count = 0.0, 0
    with torch.no_grad():
        embeds, mask = slm.embed_speech_pieces(batch.features, batch.frame_lengths,
                                               batch.prompt_before, batch.prompt_after)
        for b in range(len(batch)):
            response = batch.response_ids[b, batch.response_mask[b]]
            row = torch.cat([embeds[b, mask[b]], slm.llm.embed(response)])
            logits = slm.llm(inputs_embeds=row[None])[0].log_softmax(-1)
            start = int(mask[b].sum()) - 1
            picked = logits[start: start + response.numel()].gather(-1, response[:, None])
            nll -= float(picked.sum())
            count += response.numel()
    assert metrics["tokens"] == count == batch.num_tokens
    assert float(loss.detach()) == pytest.approx(nll / count, rel=1e-4)


def test_kd_teacher_reads_the_transcript_with_lora_off(tmp_path):
    slm = tiny_speechlm(tmp_path / "llm", lora=LoraConfig(rank=2))
    dataset = SpeechDataset(write_dataset(tmp_path / "data"), "train", slm.tokenizer)
    batch = dataset.batch([0, 1])
    teacher, _ = slm.load_teacher()
    before = slm.teacher_hidden(teacher, batch.teacher_prompt_ids, batch.response_ids,
                                batch.response_mask)
    with torch.no_grad():
        for module in lora_modules(slm.llm).values():
            module.lora_B.normal_()
    after = slm.teacher_hidden(teacher, batch.teacher_prompt_ids, batch.response_ids,
                               batch.response_mask)
    mask = batch.response_mask
    torch.testing.assert_close(after[mask], before[mask])
    loss, _ = kd_loss(slm, teacher, batch)
    loss.backward()
    assert all(module.lora_A.grad is not None for module in lora_modules(slm.llm).values())
    assert after.grad_fn is None


def test_kd_and_sft_reject_bad_options(slm_and_batch, tmp_path):
    # Calling the losses wrongly is library misuse: a ValueError, whose traceback stays.
    slm, batch = slm_and_batch
    teacher, _ = slm.load_teacher()
    padded = LlamaForCausalLM.from_pretrained(write_tiny_llm(tmp_path / "padded", padded_rows=4))
    with pytest.raises(ValueError, match="LM head has"):
        kd_loss(slm, padded, batch)
    with pytest.raises(ValueError, match="kind"):
        kd_loss(slm, teacher, batch, kind="kl")
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(slm, teacher, batch, temperature=0)
    with pytest.raises(ValueError, match="reduction"):
        sft_loss(slm, batch, reduction="none")
