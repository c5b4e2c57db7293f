"""Rollout engine on tiny random Llama models: parity with plain full forwards, seeds, errors."""
import pytest
import torch

from rba_core.errors import ConfigError, RbaError
from rba_core.models.lora import LoraConfig, apply_lora, lora_modules
from rba_core.models.llama import LlamaConfig, LlamaForCausalLM
from rba_core.models.packed import PackedProjections
from rba_core.rollout import (
    RolloutEngine,
    SamplingConfig,
    filter_logits,
    sample_tokens,
    shared_prefix_hidden,
    shared_prefix_logprobs,
)

VOCAB = 61


def tiny_model(dtype=torch.float32, *, layers=2, heads=4, kv_heads=2, tied=True,
               model_type="llama"):
    config = LlamaConfig.from_dict(dict(
        model_type=model_type, vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        tie_word_embeddings=tied, rms_norm_eps=1e-6, rope_theta=500.0))
    model = LlamaForCausalLM(config)
    # Larger-than-default weights give peaked, well separated logits (no near-ties in argmax).
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return model.to(dtype).eval()


def ragged_prompts(lengths=(5, 11, 2)):
    return [torch.randint(0, VOCAB, (n,)) for n in lengths]


def full_forward_scores(model, prompt, tokens, sampling=None):
    """Log-probs of ``tokens`` after ``prompt`` from one plain forward without any cache:
    (untempered model log-probs, sampling-distribution log-probs or None, logits)."""
    P = prompt.shape[0]
    sequence = torch.cat([model.embed(prompt) if not prompt.is_floating_point() else prompt,
                          model.embed(tokens)])
    with torch.no_grad():
        logits = model(inputs_embeds=sequence[None])[0, P - 1: P - 1 + tokens.numel()].float()
    model_logp = torch.log_softmax(logits, -1).gather(-1, tokens[:, None])[:, 0]
    sample_logp = None
    if sampling is not None and sampling.temperature > 0:
        sample_logp = torch.log_softmax(filter_logits(logits, sampling), -1).gather(
            -1, tokens[:, None])[:, 0]
    return model_logp, sample_logp, logits


def test_greedy_is_token_identical_to_plain_forward():
    model = tiny_model(torch.float64)
    prompts = ragged_prompts()
    # Prompt 1 as input embeddings (a speech prompt): the engine must treat both forms alike.
    mixed = [prompts[0], model.embed(prompts[1]).detach(), prompts[2]]
    engine = RolloutEngine(model, max_prompt_len=16, max_new_tokens=10)
    batch = engine.generate(mixed, group_size=2, sampling=SamplingConfig(temperature=0.0,
                                                                          max_new_tokens=10))
    assert batch.tokens.shape == (3, 2, 10)
    assert (batch.lengths == 10).all()
    assert batch.finish_reasons == [["length", "length"]] * 3
    assert (batch.sampling_logprobs == 0).all()
    for b, prompt in enumerate(prompts):
        # Plain greedy decoding by repeated full forwards, no cache anywhere.
        sequence = prompt.clone()
        for _ in range(10):
            with torch.no_grad():
                next_token = model(sequence[None])[0, -1].argmax()
            sequence = torch.cat([sequence, next_token[None]])
        expected = sequence[prompt.numel():]
        for g in range(2):
            assert torch.equal(batch.tokens[b, g], expected)


@pytest.mark.parametrize("backend,steps", [("torch", 9), ("triton", 4)])
def test_sampled_logprobs_equal_full_forward_with_ragged_prompts_and_early_stops(backend, steps):
    model = tiny_model(torch.float32)
    prompts = ragged_prompts((4, 9, 1))
    # The Triton interpreter is slow: fewer steps, still enough for early stops.
    sampling = SamplingConfig(temperature=0.9, top_k=40, max_new_tokens=steps,
                              stop_ids=tuple(range(0, VOCAB, 3)))
    engine = RolloutEngine(model, max_prompt_len=12, max_new_tokens=16, attention_backend=backend)
    batch = engine.generate(prompts, group_size=3, sampling=sampling, seeds=[3, 4, 5])
    # With a quarter of the vocabulary stopping, some samples end early and others run on:
    # the compacted decode must keep the survivors exact.
    assert batch.lengths.min() < batch.lengths.max()
    for b, prompt in enumerate(prompts):
        for g in range(3):
            n = int(batch.lengths[b, g])
            tokens = batch.tokens[b, g, :n]
            stopped = bool(tokens[-1] % 3 == 0)
            assert batch.finish_reasons[b][g] == ("stop" if stopped else "length")
            assert stopped or n == steps
            assert not (tokens[:-1] % 3 == 0).any()
            model_logp, sample_logp, _ = full_forward_scores(model, prompt, tokens, sampling)
            assert (batch.logprobs[b, g, :n] - model_logp).abs().max() < 1e-4
            assert (batch.sampling_logprobs[b, g, :n] - sample_logp).abs().max() < 1e-4
            assert (batch.logprobs[b, g, n:] == 0).all()


def test_static_decode_equals_compacted_decode():
    """The static-shape step (what a CUDA graph captures) keeps finished samples in the batch;
    it must give the samples the compacted step gives."""
    model = tiny_model(torch.float64)
    prompts = ragged_prompts()
    sampling = SamplingConfig(temperature=1.0, top_p=0.9, min_p=0.02, max_new_tokens=8,
                              stop_ids=(1, 2, 3, 4, 5, 6, 7))
    compact = RolloutEngine(model, max_prompt_len=16, max_new_tokens=8).generate(
        prompts, 4, sampling, seeds=[7, 8, 9])
    static = RolloutEngine(model, max_prompt_len=16, max_new_tokens=8, static_decode=True
                           ).generate(prompts, 4, sampling, seeds=[7, 8, 9])
    assert torch.equal(compact.tokens, static.tokens)
    assert torch.equal(compact.lengths, static.lengths)
    assert compact.finish_reasons == static.finish_reasons
    assert (compact.logprobs - static.logprobs).abs().max() < 1e-9


def test_same_seed_same_samples_whatever_the_batch():
    model = tiny_model(torch.float64)
    prompts = ragged_prompts()
    engine = RolloutEngine(model, max_prompt_len=16, max_new_tokens=12)
    sampling = SamplingConfig(temperature=1.2, max_new_tokens=12)
    first = engine.generate(prompts, 3, sampling, seeds=[10, 20, 30])
    again = engine.generate(prompts, 3, sampling, seeds=[10, 20, 30])
    assert torch.equal(first.tokens, again.tokens)
    assert torch.equal(first.logprobs, again.logprobs)
    alone = engine.generate([prompts[1]], 3, sampling, seeds=[20])
    assert torch.equal(alone.tokens[0], first.tokens[1])
    other = engine.generate(prompts, 3, sampling, seeds=[10, 21, 30])
    assert not torch.equal(other.tokens[1], first.tokens[1])
    assert torch.equal(other.tokens[0], first.tokens[0])
    # Without explicit seeds the global torch seed decides.
    torch.manual_seed(5)
    a = engine.generate(prompts, 2, sampling)
    torch.manual_seed(5)
    b = engine.generate(prompts, 2, sampling)
    assert torch.equal(a.tokens, b.tokens)


def test_stop_strings_end_samples_at_the_completing_token():
    model = tiny_model()

    class CharTokenizer:
        def decode(self, ids):
            return "".join(chr(ord("a") + i % 26) for i in ids)

    sampling = SamplingConfig(temperature=1.0, max_new_tokens=12, stop_strings=("a", "bc"))
    engine = RolloutEngine(model, max_prompt_len=16, max_new_tokens=12)
    batch = engine.generate(ragged_prompts(), 4, sampling, seeds=[1, 2, 3],
                            tokenizer=CharTokenizer())
    tokenizer = CharTokenizer()
    for b in range(3):
        for g in range(4):
            n = int(batch.lengths[b, g])
            text = tokenizer.decode(batch.tokens[b, g, :n].tolist())
            hit = any(s in text for s in ("a", "bc"))
            assert batch.finish_reasons[b][g] == ("stop_string" if hit else "length")
            if hit:
                assert not any(s in text[:-1] for s in ("a", "bc"))
    with pytest.raises(ValueError, match="tokenizer"):
        engine.generate(ragged_prompts(), 2, sampling)


def test_scoring_matches_full_forwards_with_entropy():
    model = tiny_model(torch.float32, tied=False)
    engine = RolloutEngine(model, max_prompt_len=16, max_new_tokens=8)
    prompts = ragged_prompts((7, 3))
    continuations = [[torch.randint(0, VOCAB, (n,)) for n in (5, 1, 3)],
                     [torch.randint(0, VOCAB, (n,)) for n in (2, 6, 4)]]
    scores = engine.score(prompts, continuations, return_entropy=True, temperature=1.5)
    assert scores.logprobs.shape == (2, 3, 6)
    for b in range(2):
        for g in range(3):
            tokens = continuations[b][g]
            n = tokens.numel()
            _, _, logits = full_forward_scores(model, prompts[b], tokens)
            logp = torch.log_softmax(logits / 1.5, -1)
            expected = logp.gather(-1, tokens[:, None])[:, 0]
            entropy = -(logp.exp() * logp).sum(-1)
            assert (scores.logprobs[b, g, :n] - expected).abs().max() < 1e-4
            assert (scores.entropy[b, g, :n] - entropy).abs().max() < 1e-4
            assert (scores.logprobs[b, g, n:] == 0).all() and not scores.mask[b, g, n:].any()


def test_scoring_a_rollout_batch_reproduces_its_logprobs():
    model = tiny_model()
    engine = RolloutEngine(model, max_prompt_len=16, max_new_tokens=8)
    prompts = ragged_prompts()
    batch = engine.generate(prompts, 3, SamplingConfig(temperature=1.0, max_new_tokens=8,
                                                       stop_ids=(0, 1, 2, 3, 4)), seeds=[1, 2, 3])
    scores = engine.score(prompts, batch.tokens, batch.lengths)
    assert (scores.logprobs - batch.logprobs).abs().max() < 1e-4


def test_shared_prefix_training_forward_equals_unshared_loss_and_grads():
    model = tiny_model(torch.float64)
    for p in model.parameters():
        p.requires_grad_(True)
    lengths_p = (6, 3)
    # Speech-like prompts: embeddings from an upstream module that must receive gradients.
    base = [torch.randn(n, 32, dtype=torch.float64, requires_grad=True) for n in lengths_p]
    G, T = 3, 5
    tokens = torch.randint(0, VOCAB, (2, G, T))
    lengths = torch.tensor([[5, 2, 4], [1, 5, 3]])
    weights = torch.randn(2, G, T, dtype=torch.float64)

    def take_grads():
        grads = [p.grad.clone() for p in model.parameters()] + [x.grad.clone() for x in base]
        model.zero_grad()
        for x in base:
            x.grad = None
        return grads

    # Exact float64 path: shared-prefix hidden states, then a plain log-softmax.
    hidden = shared_prefix_hidden(model, base, tokens, lengths)
    logp = torch.log_softmax(hidden @ model.lm_head_weight.T, -1).gather(-1, tokens[..., None])
    mask = torch.arange(T) < lengths[..., None]
    loss = (logp[..., 0] * weights * mask).sum()
    loss.backward()
    shared_grads = take_grads()
    # Through the fused token-score op (it accumulates in float32, hence the looser bound).
    scores = shared_prefix_logprobs(model, base, tokens, lengths, backend="torch")
    fused_loss = (scores.logprobs * weights).sum()
    fused_loss.backward()
    fused_grads = take_grads()

    unshared = 0.0
    for b in range(2):
        for g in range(G):
            n = int(lengths[b, g])
            P = lengths_p[b]
            sequence = torch.cat([base[b], model.embed(tokens[b, g, :n])])
            logits = model(inputs_embeds=sequence[None])[0, P - 1: P - 1 + n]
            logp = torch.log_softmax(logits, -1).gather(-1, tokens[b, g, :n, None])[:, 0]
            unshared = unshared + (logp * weights[b, g, :n]).sum()
    unshared.backward()
    unshared_grads = take_grads()
    # The model's RMSNorm computes in float32 even for float64 weights, which bounds the
    # agreement of two differently ordered float64 computations at about 1e-7 relative.
    assert abs(loss.item() - unshared.item()) < 1e-6 * abs(unshared.item())
    assert abs(fused_loss.item() - unshared.item()) < 1e-5 * abs(unshared.item())
    for exact, fused, want in zip(shared_grads, fused_grads, unshared_grads):
        size = want.abs().max()
        assert size > 0
        assert (exact - want).abs().max() < 1e-6 * size
        assert (fused - want).abs().max() < 1e-5 * size


def with_live_lora(model, targets):
    apply_lora(model, LoraConfig(rank=2, targets=targets))
    for module in lora_modules(model).values():
        torch.nn.init.normal_(module.lora_B, std=0.3)  # a non-zero update that must show
    return model


def test_packed_projections_compute_what_the_modules_do():
    # Qwen2 has q/k/v biases; the LoRA-wrapped projections must run live, not from a copy.
    model = with_live_lora(tiny_model(model_type="qwen2", tied=False), ("q_proj", "up_proj"))
    packed = PackedProjections(model)
    x = torch.randn(3, 5, 32)
    attended = torch.randn(3, 4, 5, 8)
    close = dict(atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        for layer, p in zip(model.model.layers, packed.layers):
            for ours, want in zip(p.project_qkv(x), layer.self_attn.project_qkv(x)):
                torch.testing.assert_close(ours, want, **close)
            torch.testing.assert_close(p.project_out(attended),
                                       layer.self_attn.project_out(attended), **close)
            torch.testing.assert_close(p.mlp(x), layer.mlp(x), **close)
        torch.testing.assert_close(packed.lm_head(x[:, 0]), x[:, 0] @ model.lm_head_weight.T,
                                   **close)


def test_packed_copies_are_rebuilt_after_weight_changes():
    model = tiny_model()
    packed = PackedProjections(model)
    assert packed.matches(model)
    packed_engine = RolloutEngine(model, max_prompt_len=16, max_new_tokens=6)
    plain_engine = RolloutEngine(model, max_prompt_len=16, max_new_tokens=6, pack_weights=False)
    prompts = ragged_prompts()
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=6)

    def same_rollouts():
        ours, want = (e.generate(prompts, 2, sampling) for e in (packed_engine, plain_engine))
        assert torch.equal(ours.tokens, want.tokens)
        assert (ours.logprobs - want.logprobs).abs().max() < 1e-4

    same_rollouts()
    # An optimizer step updates the weights in place between rollouts.
    model.model.layers[1].mlp.down_proj.weight.grad = torch.randn(32, 48)
    model.lm_head_weight.grad = torch.randn(VOCAB, 32)
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    assert not packed.matches(model)
    same_rollouts()
    # Wrapping a projection in LoRA after packing: the copy must give way to the live module.
    packed = PackedProjections(model)
    with_live_lora(model, ("v_proj",))
    assert not packed.matches(model)
    same_rollouts()


def test_kv_memory_follows_the_shared_layout():
    model = tiny_model()
    engine = RolloutEngine(model)
    P, G, T = 256, 8, 64
    shared, unshared = engine.kv_memory([P], G, T)
    assert shared / unshared == pytest.approx((P + G * T) / (G * (P + T)))
    engine.generate([torch.randint(0, VOCAB, (9,))], 3, SamplingConfig(max_new_tokens=4))
    cache = engine.cache
    assert cache.prefix_k.shape[1:4] == (1, 2, 9) and cache.suffix_k.shape[1:4] == (3, 2, 4)


@pytest.mark.parametrize("config", [
    SamplingConfig(temperature=0.7, top_k=4),
    SamplingConfig(temperature=1.3, top_k=5, top_p=0.8, min_p=0.05),
    SamplingConfig(temperature=0.9, top_p=0.7),
    SamplingConfig(temperature=1.0, min_p=0.1),
])
def test_sample_tokens_draws_from_the_filtered_distribution(config):
    logits = torch.randn(1, 6) * 2
    n = 20000
    tokens, model_logp, sample_logp = sample_tokens(logits.expand(n, 6), torch.rand(n,
                                                    dtype=torch.float64), config)
    probs = torch.softmax(filter_logits(logits, config), -1)[0]
    freq = torch.bincount(tokens, minlength=6).double() / n
    assert (freq - probs.double()).abs().max() < 0.02
    assert (freq[probs == 0] == 0).all()
    assert torch.allclose(sample_logp, probs.log()[tokens])
    assert torch.allclose(model_logp, torch.log_softmax(logits, -1)[0][tokens])


def test_filters_keep_the_intended_tokens():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]])
    probs = torch.softmax(logits, -1)[0]
    kept = lambda cfg: torch.isfinite(filter_logits(logits, cfg))[0]  # noqa: E731
    assert kept(SamplingConfig(top_k=2)).tolist() == [True, True] + [False] * 4
    # top-p keeps the smallest head whose mass reaches p.
    p = float(probs[:3].sum()) - 1e-3
    assert kept(SamplingConfig(top_p=p)).tolist() == [True] * 3 + [False] * 3
    assert kept(SamplingConfig(top_p=1e-6)).tolist() == [True] + [False] * 5
    threshold = float(probs[2] / probs[0]) + 1e-4
    assert kept(SamplingConfig(min_p=threshold)).tolist() == [True, True] + [False] * 4


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.5), ("temperature", float("nan")), ("top_k", -1), ("top_k", 2.5),
    ("top_p", 0.0), ("top_p", 1.5), ("min_p", 1.0), ("min_p", -0.1), ("max_new_tokens", 0),
    ("stop_ids", (-3,)),
])
def test_invalid_sampling_values_are_refused(field, value):
    engine = RolloutEngine(tiny_model(), max_prompt_len=8, max_new_tokens=8)
    sampling = SamplingConfig(**{field: value})
    with pytest.raises(ConfigError, match=f"sampling.{field}"):
        engine.generate([torch.tensor([1, 2])], 2, sampling)


def test_bad_inputs_give_clear_errors():
    model = tiny_model()
    engine = RolloutEngine(model, max_prompt_len=8, max_new_tokens=64)
    ok = [torch.tensor([1, 2, 3])]
    # A user's input (a prompt longer than the cache, a tokenizer naming stop ids the model
    # lacks) is a ConfigError the CLI prints as one line.
    with pytest.raises(ConfigError, match="prompt 0 has 9 tokens but the cache holds 8"):
        engine.generate([torch.arange(9)], 2)
    with pytest.raises(ConfigError, match="stop_ids must be < the vocabulary"):
        engine.generate(ok, 2, SamplingConfig(stop_ids=(VOCAB,)))
    # A programmer's wrong arguments are ValueError / TypeError, whose traceback the CLI keeps.
    misuse = [
        (ValueError, "prompt 1 is empty",
         lambda: engine.generate([torch.tensor([1]), torch.tensor([], dtype=torch.long)], 2)),
        (ValueError, "group_size must be an integer >= 1", lambda: engine.generate(ok, 0)),
        (ValueError, "max_new_tokens",
         lambda: engine.generate(ok, 2, SamplingConfig(max_new_tokens=65))),
        (ValueError, "outside", lambda: engine.generate([torch.tensor([1, VOCAB])], 2)),
        (ValueError, r"\[P, 32\]", lambda: engine.generate([torch.randn(3, 31)], 2)),
        (TypeError, "non-empty list", lambda: engine.generate(torch.tensor([1, 2]), 2)),
        (ValueError, "seeds must be 1 integers", lambda: engine.generate(ok, 2, seeds=[1, 2])),
        (ValueError, "one group per prompt",
         lambda: engine.score(ok, torch.zeros(2, 2, 3, dtype=torch.long))),
        (ValueError, "T = 0", lambda: engine.score(ok, torch.zeros(1, 2, 0, dtype=torch.long))),
        (ValueError, "G >= 1", lambda: engine.score(ok, torch.zeros(1, 0, 3, dtype=torch.long))),
        (ValueError, "same number", lambda: engine.score(
            ok + ok, [[torch.tensor([1])], [torch.tensor([1]), torch.tensor([2])]])),
        (ValueError, "cuda_graph=True needs the model on a CUDA",
         lambda: RolloutEngine(model, cuda_graph=True)),
        (ValueError, "max_prompt_len must be an integer >= 1",
         lambda: RolloutEngine(model, max_prompt_len=0)),
    ]
    for error, words, call in misuse:
        with pytest.raises(error, match=words) as raised:
            call()
        assert not isinstance(raised.value, RbaError), words


def test_a_prompt_past_the_context_is_refused_before_any_forward(monkeypatch):
    from rba_core.rollout import generate

    model = tiny_model()
    model.config.max_position_embeddings = 64

    def no_forward(*args, **kwargs):
        raise AssertionError("the model ran on a prompt it cannot take")

    monkeypatch.setattr(model, "forward", no_forward)
    sampling = SamplingConfig(max_new_tokens=8)
    with pytest.raises(ConfigError, match="prompt 0 has 20001 tokens and 8 new tokens, past the "
                                          "model's context of 64 positions"):
        generate(model, [torch.randint(0, VOCAB, (20001,))], sampling)
    # The new tokens count too: 60 + 8 positions do not fit 64.
    engine = RolloutEngine(model, max_prompt_len=128, max_new_tokens=8)
    with pytest.raises(ConfigError, match="prompt 1 has 60 tokens and 8 new"):
        engine.generate([torch.arange(4), torch.arange(60)], 2, sampling)
    with pytest.raises(ConfigError, match="prompt 0 has 60 tokens and 8 new"):
        engine.score([torch.arange(60)], torch.zeros(1, 2, 8, dtype=torch.long))
    with pytest.raises(ConfigError, match="prompt 0 has 60 tokens and 8 new"):
        shared_prefix_logprobs(model, [torch.arange(60)], torch.zeros(1, 2, 8, dtype=torch.long))


def test_finished_samples_leave_the_decode_batch(monkeypatch):
    from rba_core.rollout.cache import CascadeAttention

    batch_sizes = []
    real_init = CascadeAttention.__init__

    def recording_init(self, prefix_keys, prefix_values, prefix_lens, sample_prompt, *args,
                       **kwargs):
        if kwargs.get("cache") is not None:  # a decode step (the prefill has no suffix)
            batch_sizes.append(sample_prompt.shape[0])
        real_init(self, prefix_keys, prefix_values, prefix_lens, sample_prompt, *args, **kwargs)

    monkeypatch.setattr(CascadeAttention, "__init__", recording_init)
    model = tiny_model()
    engine = RolloutEngine(model, max_prompt_len=16, max_new_tokens=10)
    batch = engine.generate(ragged_prompts(), 4, SamplingConfig(
        temperature=1.0, max_new_tokens=10, stop_ids=tuple(range(0, VOCAB, 3))), seeds=[4, 5, 6])
    # The step after token t runs exactly the samples still going after t.
    assert len(batch_sizes) == int(batch.lengths.max()) - 1
    for t, size in enumerate(batch_sizes):
        assert size == int((batch.lengths > t + 1).sum())
    assert batch_sizes[-1] < 12
