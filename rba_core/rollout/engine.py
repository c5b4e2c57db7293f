"""Group rollouts and scoring over shared-prefix KV caches.

    engine = RolloutEngine(model, max_prompt_len=1024)
    batch = engine.generate(prompts, group_size=8, sampling=SamplingConfig(temperature=1.0),
                            seeds=[0, 1])
    scores = engine.score(teacher_prompts, batch.tokens, batch.lengths)

The engine knows nothing of RL or audio: prompts are token ids or input embeddings, outputs
are tensors.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from rba_core.errors import ConfigError
from rba_core.models.packed import PackedProjections
from rba_core.rollout.cache import CascadeAttention, SharedPrefixKVCache, unshared_kv_bytes
from rba_core.rollout.prompts import Prompts, check_context, check_model, embed_prompts, prefill
from rba_core.rollout.sampling import SamplingConfig, sample_tokens

FINISH_STOP = "stop"
FINISH_STOP_STRING = "stop_string"
FINISH_LENGTH = "length"


class Decoder(Protocol):
    def decode(self, ids: list[int]) -> str: ...


@dataclass
class RolloutBatch:
    """G samples for each of B prompts, right-padded to the longest sample.

    ``tokens [B, G, T]`` (``pad_id`` after each length), ``logprobs [B, G, T]`` of each sampled
    token under the untempered model, ``sampling_logprobs [B, G, T]`` under the distribution it
    was drawn from (after temperature and filters; 0 for greedy), ``lengths [B, G]``,
    ``finish_reasons[b][g]`` in {"stop", "stop_string", "length"}, ``prompt_lens [B]``.
    Padding positions hold 0 in both log-prob tensors.
    """

    tokens: torch.Tensor
    logprobs: torch.Tensor
    sampling_logprobs: torch.Tensor
    lengths: torch.Tensor
    finish_reasons: list[list[str]]
    prompt_lens: torch.Tensor

    @property
    def mask(self) -> torch.Tensor:
        """``[B, G, T]`` True at real (non-padding) tokens."""
        T = self.tokens.shape[-1]
        return torch.arange(T, device=self.lengths.device) < self.lengths[..., None]

    def sequences(self) -> list[list[list[int]]]:
        """Each sample's token ids up to its length, ``[b][g] -> list``."""
        tokens, lengths = self.tokens.tolist(), self.lengths.tolist()
        return [[row[:n] for row, n in zip(group, group_lengths)]
                for group, group_lengths in zip(tokens, lengths)]


@dataclass
class ScoreBatch:
    """Per-token log-probs ``[B, G, T]`` (0 at padding), optional entropy, and the mask."""

    logprobs: torch.Tensor
    entropy: torch.Tensor | None
    mask: torch.Tensor


def _check_group_size(group_size: object) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"rollout: group_size must be an integer >= 1, got {group_size!r}")
    return group_size


def continuations_tensor(continuations: torch.Tensor | Sequence[Sequence[torch.Tensor]],
                         lengths: torch.Tensor | None, num_prompts: int, vocab: int,
                         device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Continuations as ``[B, G, T]`` ids plus ``[B, G]`` lengths, from either a padded tensor
    (with lengths, e.g. a RolloutBatch's) or lists of G id tensors per prompt."""
    if isinstance(continuations, torch.Tensor):
        if continuations.dim() != 3 or continuations.is_floating_point():
            raise ValueError(f"rollout: continuations must be token ids [B, G, T], got "
                             f"{continuations.dtype} of shape {tuple(continuations.shape)}")
        ids = continuations.to(device)
        if lengths is None:
            lengths = torch.full(ids.shape[:2], ids.shape[2], dtype=torch.long)
        lengths = lengths.to(device=device, dtype=torch.long)
        if tuple(lengths.shape) != tuple(ids.shape[:2]):
            raise ValueError(f"rollout: lengths must be [B, G] = {list(ids.shape[:2])}, got "
                             f"{tuple(lengths.shape)}")
    else:
        if lengths is not None:
            raise ValueError("rollout: lengths goes with a padded [B, G, T] tensor; lists of "
                             "continuations carry their own lengths")
        groups = [list(g) for g in continuations]
        if not groups or any(len(g) != len(groups[0]) for g in groups) or not groups[0]:
            raise ValueError("rollout: continuations must list the same number (>= 1) of id "
                             "tensors for every prompt")
        for b, group in enumerate(groups):
            for g, c in enumerate(group):
                if not isinstance(c, torch.Tensor) or c.dim() != 1 or c.is_floating_point():
                    raise ValueError(f"rollout: continuation [{b}][{g}] must be a 1-D tensor "
                                     "of token ids")
        T = max(c.numel() for group in groups for c in group)
        ids = torch.zeros(len(groups), len(groups[0]), max(T, 1), dtype=torch.long, device=device)
        lengths = torch.zeros(len(groups), len(groups[0]), dtype=torch.long, device=device)
        for b, group in enumerate(groups):
            for g, c in enumerate(group):
                ids[b, g, : c.numel()] = c.to(device)
                lengths[b, g] = c.numel()
    if ids.shape[0] != num_prompts:
        raise ValueError(f"rollout: {ids.shape[0]} groups of continuations for {num_prompts} "
                         "prompts; pass one group per prompt")
    if ids.shape[1] < 1:
        raise ValueError("rollout: each prompt needs at least one continuation (G >= 1)")
    if ids.shape[2] < 1:
        raise ValueError("rollout: continuations [B, G, T] have T = 0; there is nothing to "
                         "score")
    if int(lengths.min()) < 0 or int(lengths.max()) > ids.shape[2]:
        raise ValueError(f"rollout: continuation lengths must lie in [0, {ids.shape[2]}]")
    valid = torch.arange(ids.shape[2], device=device) < lengths[..., None]
    if valid.any() and (int(ids[valid].min()) < 0 or int(ids[valid].max()) >= vocab):
        raise ValueError(f"rollout: continuations hold token ids outside [0, {vocab})")
    return ids.masked_fill(~valid, 0), lengths


def _finished(new: torch.Tensor, active: torch.Tensor, t: int, tokens: torch.Tensor,
              reasons: list[str], sampling: SamplingConfig, stop_ids: torch.Tensor,
              tokenizer: Decoder | None) -> torch.Tensor:
    """Which of the just-drawn tokens ``new`` (of samples ``active``) end their sample; records
    the finish reason. ``tokens [S, T]`` holds every sample's tokens up to step t."""
    done = torch.isin(new, stop_ids)
    for j in done.nonzero()[:, 0].tolist():
        reasons[int(active[j])] = FINISH_STOP
    if sampling.stop_strings:
        # A stop string completed by this token lies within the last few tokens: decoding a
        # tail of (longest stop string + slack) tokens finds it without re-decoding everything.
        window = max(len(s) for s in sampling.stop_strings) + 8
        for j, s in enumerate(active.tolist()):
            if not done[j]:
                text = tokenizer.decode(tokens[s, max(0, t + 1 - window): t + 1].tolist())
                if any(stop in text for stop in sampling.stop_strings):
                    reasons[s] = FINISH_STOP_STRING
                    done[j] = True
    return done


def _score_hidden(prompt_hidden: torch.Tensor, prompts: Prompts, cont_hidden: torch.Tensor,
                  B: int, G: int) -> torch.Tensor:
    """Hidden states that predict each continuation token: the prompt's last one for token 0,
    then the continuation's own, shifted by one. ``[B, G, T, hidden]``."""
    last = prompt_hidden[torch.arange(B, device=prompt_hidden.device), prompts.lens - 1]
    T = cont_hidden.shape[1]
    first = last[:, None, None, :].expand(B, G, 1, last.shape[-1])
    rest = cont_hidden.reshape(B, G, T, -1)[:, :, : T - 1]
    return torch.cat([first, rest], dim=2)


def shared_prefix_hidden(model: torch.nn.Module, prompts: Sequence[torch.Tensor],
                         continuations: torch.Tensor | Sequence[Sequence[torch.Tensor]],
                         lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Final-normed hidden states predicting every continuation token, ``[B, G, T, hidden]``.

    The prompt runs once per group and its keys/values are attended to by all G
    continuations, so gradients from every continuation flow back into the one prompt pass
    (and into prompt embeddings that require grad). Differentiable; equal to running each
    ``prompt + continuation`` on its own.
    """
    check_model(model)
    p = embed_prompts(model, prompts)
    ids, lengths = continuations_tensor(continuations, lengths, len(p.lens_list),
                                        model.model.embed_tokens.weight.shape[0], p.embeds.device)
    B, G, T = ids.shape
    for b, prompt_len in enumerate(p.lens_list):
        check_context(model, prompt_len, T, f"rollout: prompt {b}")
    prompt_hidden, prefix = prefill(model, p)
    sample_prompt = torch.arange(B, device=ids.device).repeat_interleave(G)
    positions = p.lens[sample_prompt][:, None] + torch.arange(T, device=ids.device)
    attention = CascadeAttention(
        prefix.keys, prefix.values, p.lens, sample_prompt, G, backend="torch",
        suffix_lens=torch.full((B * G,), T, dtype=torch.long, device=ids.device))
    cont_hidden = model(inputs_embeds=model.embed(ids.reshape(B * G, T)), position_ids=positions,
                        kv_cache=attention, return_hidden=True)
    return _score_hidden(prompt_hidden, p, cont_hidden, B, G)


def shared_prefix_logprobs(model: torch.nn.Module, prompts: Sequence[torch.Tensor],
                           continuations: torch.Tensor | Sequence[Sequence[torch.Tensor]],
                           lengths: torch.Tensor | None = None, *, temperature: float = 1.0,
                           return_entropy: bool = False, backend: str = "auto") -> ScoreBatch:
    """Per-token log-probs ``[B, G, T]`` of the continuations through the fused token-score op
    (no ``[N, V]`` logits), differentiable: the training forward with a shared prefix.
    ``backend`` goes to ``fused_linear_logprobs``."""
    from rba_core.kernels import fused_linear_logprobs

    weight = model.model.embed_tokens.weight
    ids, lengths = continuations_tensor(continuations, lengths, len(prompts), weight.shape[0],
                                        weight.device)
    hidden = shared_prefix_hidden(model, prompts, ids, lengths)
    B, G, T, D = hidden.shape
    mask = torch.arange(T, device=hidden.device) < lengths[..., None]
    result = fused_linear_logprobs(hidden.reshape(B * G, T, D), model.lm_head_weight,
                                   ids.reshape(B * G, T), mask=mask.reshape(B * G, T),
                                   temperature=temperature, return_entropy=return_entropy,
                                   backend=backend)
    if return_entropy:
        logp, entropy = result.logprobs, result.entropy.reshape(B, G, T).masked_fill(~mask, 0.0)
    else:
        logp, entropy = result, None
    return ScoreBatch(logp.reshape(B, G, T).masked_fill(~mask, 0.0), entropy, mask)


class RolloutEngine:
    """Group sampling and scoring for one Llama-family model with shared-prefix KV caches.

    ``max_prompt_len`` is the cache's prompt capacity (longer prompts are refused);
    ``max_new_tokens`` caps any request's ``sampling.max_new_tokens``. The cache is allocated
    for a rollout's batch and reused while later rollouts fit it; decoding never reallocates.
    ``cuda_graph=True`` (CUDA only) captures the decode step in a CUDA graph per (B, G); all
    samples then run every step (static shapes) while finished ones are ignored.
    ``static_decode=True`` runs that same static-shape step without capturing it (any device).
    ``attention_backend`` picks the cascade attention path ("auto", "torch", "triton").
    ``pack_weights`` (compacted decoding on the CPU) runs the decode steps' projections and LM
    head from fused, prepacked copies (``rba_core.models.packed``): faster steps for one more
    copy of the weights, rebuilt (about a second for 135M parameters on one core) when the
    model's weights have changed since the last rollout.
    """

    def __init__(self, model: torch.nn.Module, *, max_prompt_len: int = 2048,
                 max_new_tokens: int = 1024, cuda_graph: bool = False,
                 static_decode: bool = False, attention_backend: str = "auto",
                 pack_weights: bool = True) -> None:
        check_model(model)
        for name, value in (("max_prompt_len", max_prompt_len),
                            ("max_new_tokens", max_new_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"RolloutEngine: {name} must be an integer >= 1, got {value!r}")
        weight = model.model.embed_tokens.weight
        if cuda_graph and weight.device.type != "cuda":
            raise ValueError("RolloutEngine: cuda_graph=True needs the model on a CUDA device; "
                             f"it is on {weight.device}")
        self.model = model
        self.max_prompt_len = max_prompt_len
        self.max_new_tokens = max_new_tokens
        self.cuda_graph = cuda_graph
        self.static_decode = static_decode or cuda_graph
        self.attention_backend = attention_backend
        self.pack_weights = pack_weights
        self._packed: PackedProjections | None = None
        self.cache: SharedPrefixKVCache | None = None
        self._graphs: dict[tuple[int, int, int], _GraphedDecode] = {}

    @property
    def device(self) -> torch.device:
        return self.model.model.embed_tokens.weight.device

    def _cache_for(self, B: int, P: int, S: int, T: int) -> SharedPrefixKVCache:
        weight = self.model.model.embed_tokens.weight
        if (self.cache is None or not self.cache.fits(B, P, S, T)
                or self.cache.prefix_k.dtype != weight.dtype
                or self.cache.prefix_k.device != weight.device):
            config = self.model.config
            self.cache = None
            self._graphs.clear()
            self.cache = SharedPrefixKVCache.allocate(
                num_layers=config.num_hidden_layers, num_kv_heads=config.num_key_value_heads,
                head_dim=config.head_dim, num_prompts=B, max_prompt_len=P, num_rows=S,
                max_new_tokens=T, dtype=weight.dtype, device=weight.device)
        return self.cache

    def release_packed_weights(self) -> None:
        """Free the packed decode copy now (the next rollout rebuilds it): for callers whose
        next step changes the weights anyway, so the copy would only hold memory meanwhile."""
        self._packed = None

    def _packed_projections(self) -> PackedProjections | None:
        # Only the compacted CPU step uses them: a captured (static) step must keep reading the
        # live weights, which an optimizer updates in place between rollouts, and on a GPU the
        # extra copy of the weights would cost memory that the KV cache needs more.
        if not self.pack_weights or self.static_decode or self.device.type != "cpu":
            return None
        if self._packed is None or not self._packed.matches(self.model):
            self._packed = None  # free the stale copy before building the new one
            self._packed = PackedProjections(self.model)
        return self._packed

    def kv_memory(self, prompt_lens: Sequence[int], group_size: int, new_tokens: int
                  ) -> tuple[int, int]:
        """(shared-layout bytes, unshared-layout bytes) of K/V for such a rollout."""
        config = self.model.config
        element = self.model.model.embed_tokens.weight.element_size()
        per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
        shared = per_token * element * (sum(prompt_lens) + len(prompt_lens) * group_size
                                        * new_tokens)
        unshared = unshared_kv_bytes(
            num_layers=config.num_hidden_layers, num_kv_heads=config.num_key_value_heads,
            head_dim=config.head_dim, element_size=element, prompt_lens=list(prompt_lens),
            group_size=group_size, new_tokens=new_tokens)
        return shared, unshared

    @torch.no_grad()
    def generate(self, prompts: Sequence[torch.Tensor], group_size: int,
                 sampling: SamplingConfig | None = None, *, seeds: Sequence[int] | None = None,
                 tokenizer: Decoder | None = None, pad_id: int = 0) -> RolloutBatch:
        """Sample ``group_size`` continuations of every prompt.

        ``seeds[b]`` fixes prompt b's draws: the same seed gives the same samples whatever
        else is in the batch (up to floating-point differences in the batched math). Without
        seeds, per-prompt seeds are drawn from torch's global RNG, so ``torch.manual_seed``
        makes runs repeatable. Stop strings need ``tokenizer``.
        """
        sampling = sampling or SamplingConfig()
        sampling.validate()
        G = _check_group_size(group_size)
        if sampling.max_new_tokens > self.max_new_tokens:
            raise ValueError(f"rollout: sampling.max_new_tokens={sampling.max_new_tokens} "
                             f"exceeds the engine's max_new_tokens={self.max_new_tokens}; "
                             "raise it when building the RolloutEngine")
        if sampling.stop_strings and tokenizer is None:
            raise ValueError("rollout: sampling.stop_strings need a tokenizer to decode the "
                             "samples; pass tokenizer=")
        vocab = self.model.model.embed_tokens.weight.shape[0]
        if any(t >= vocab for t in sampling.stop_ids):
            raise ConfigError(f"rollout: sampling.stop_ids must be < the vocabulary size {vocab}")
        p = embed_prompts(self.model, prompts, max_prompt_len=self.max_prompt_len,
                          new_tokens=sampling.max_new_tokens)
        B = len(p.lens_list)
        if seeds is None:
            seeds = torch.randint(0, 2**62, (B,)).tolist()
        if len(seeds) != B or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
            raise ValueError(f"rollout: seeds must be {B} integers (one per prompt), got "
                             f"{seeds!r}")
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        return self._generate(p, G, sampling, generators, tokenizer, pad_id)

    def _generate(self, p: Prompts, G: int, sampling: SamplingConfig,
                  generators: list[torch.Generator], tokenizer: Decoder | None,
                  pad_id: int) -> RolloutBatch:
        model = self.model
        dev = self.device
        B, S, T_max = len(p.lens_list), len(p.lens_list) * G, sampling.max_new_tokens
        cache = self._cache_for(B, p.embeds.shape[1], S, T_max)
        cache.reset(p.lens)
        # The prompt runs through the modules: at hundreds of rows MKL's GEMM is as fast as
        # oneDNN's, and the packed copies only pay off on the few rows of a decode step.
        prompt_hidden, _ = prefill(model, p, cache)
        packed = self._packed_projections()
        last = prompt_hidden[torch.arange(B, device=dev), p.lens - 1]
        weight = model.lm_head_weight
        lm_head = packed.lm_head if packed is not None else lambda h: h @ weight.T
        logits = lm_head(last).repeat_interleave(G, dim=0)

        prefix_keys = [cache.prefix_k[i, :B] for i in range(len(model.model.layers))]
        prefix_values = [cache.prefix_v[i, :B] for i in range(len(model.model.layers))]
        sample_prompt_all = torch.arange(B, device=dev).repeat_interleave(G)
        prompt_lens_of = p.lens[sample_prompt_all]

        tokens = torch.full((S, T_max), pad_id, dtype=torch.long)
        logp = torch.zeros(S, T_max, dtype=torch.float32)
        sample_logp = torch.zeros(S, T_max, dtype=torch.float32)
        lengths = torch.zeros(S, dtype=torch.long)
        reasons = [FINISH_LENGTH] * S
        stop_ids = torch.tensor(sorted(set(sampling.stop_ids)), dtype=torch.long)
        graphed = self._graph_for(B, G) if self.static_decode else None

        active = torch.arange(S)  # sample indices still generating, in (prompt, g) order
        for t in range(T_max):
            # Every request draws G uniforms per step, finished samples included, so its stream
            # depends on its seed alone.
            uniforms = torch.cat([torch.rand(G, generator=g, dtype=torch.float64)
                                  for g in generators])
            if graphed is None:
                step_logits = logits
            else:
                step_logits = logits[active.to(dev)]
            new, new_logp, new_slogp = sample_tokens(step_logits, uniforms[active].to(dev),
                                                     sampling)
            new = new.cpu()
            tokens[active, t] = new
            logp[active, t] = new_logp.float().cpu()
            sample_logp[active, t] = new_slogp.float().cpu()
            lengths[active] = t + 1
            done = _finished(new, active, t, tokens, reasons, sampling, stop_ids, tokenizer)
            if t == T_max - 1 or bool(done.all()):
                break
            active, new = active[~done], new[~done]
            if graphed is not None:
                # The static step runs every sample; finished ones are fed any token and ignored.
                logits = graphed.step(tokens[:, t].to(dev), prompt_lens_of + t, t)
                continue
            active_dev = active.to(dev)
            attention = CascadeAttention(
                prefix_keys, prefix_values, cache.prefix_lens[:B], sample_prompt_all[active_dev],
                G, cache=cache, rows=active_dev, cache_position=t,
                suffix_lens=torch.full((active.numel(),), t + 1, dtype=torch.long, device=dev),
                backend=self.attention_backend)
            hidden = model(inputs_embeds=model.embed(new.to(dev))[:, None],
                           position_ids=(prompt_lens_of[active_dev] + t)[:, None],
                           kv_cache=attention, return_hidden=True, packed=packed)
            logits = lm_head(hidden[:, 0])

        T_out = int(lengths.max())
        return RolloutBatch(
            tokens=tokens[:, :T_out].reshape(B, G, T_out).to(dev),
            logprobs=logp[:, :T_out].reshape(B, G, T_out).to(dev),
            sampling_logprobs=sample_logp[:, :T_out].reshape(B, G, T_out).to(dev),
            lengths=lengths.reshape(B, G).to(dev),
            finish_reasons=[reasons[b * G:(b + 1) * G] for b in range(B)],
            prompt_lens=p.lens.clone(),
        )

    def _graph_for(self, B: int, G: int) -> "_GraphedDecode":
        key = (B, G, id(self.cache))
        if key not in self._graphs:
            self._graphs[key] = _GraphedDecode(self, B, G, capture=self.cuda_graph)
        return self._graphs[key]

    @torch.no_grad()
    def score(self, prompts: Sequence[torch.Tensor],
              continuations: torch.Tensor | Sequence[Sequence[torch.Tensor]],
              lengths: torch.Tensor | None = None, *, temperature: float = 1.0,
              return_entropy: bool = False) -> ScoreBatch:
        """Per-token log-probs ``[B, G, T]`` of G continuations of each prompt, the prompt
        prefilled once, through the fused token-score op (no ``[N, V]`` logits).

        ``continuations`` is a padded ``[B, G, T]`` id tensor with ``lengths [B, G]`` (a
        RolloutBatch's tokens and lengths) or, per prompt, a list of G 1-D id tensors.
        """
        embed_prompts(self.model, prompts, max_prompt_len=self.max_prompt_len)
        return shared_prefix_logprobs(self.model, prompts, continuations, lengths,
                                      temperature=temperature, return_entropy=return_entropy)


class _GraphedDecode:
    """The decode step over all B * G samples (layers and LM head) with static shapes,
    captured in one CUDA graph when ``capture``.

    Inputs live in static buffers refreshed before each replay; the write position and suffix
    lengths are device tensors, so nothing the graph reads from the host changes.
    """

    def __init__(self, engine: RolloutEngine, B: int, G: int, *, capture: bool) -> None:
        model, cache = engine.model, engine.cache
        dev = engine.device
        S = B * G
        self.tokens = torch.zeros(S, dtype=torch.long, device=dev)
        self.positions = torch.zeros(S, dtype=torch.long, device=dev)
        self.cache_position = torch.zeros(1, dtype=torch.long, device=dev)
        self.suffix_lens = torch.ones(S, dtype=torch.long, device=dev)
        rows = torch.arange(S, device=dev)
        sample_prompt = torch.arange(B, device=dev).repeat_interleave(G)
        group_starts = torch.arange(B + 1, device=dev) * G
        layers = len(model.model.layers)
        prefix_keys = [cache.prefix_k[i, :B] for i in range(layers)]
        prefix_values = [cache.prefix_v[i, :B] for i in range(layers)]
        prefix_lens = cache.prefix_lens[:B]
        weight = model.lm_head_weight

        attention = CascadeAttention(
            prefix_keys, prefix_values, prefix_lens, sample_prompt, G, cache=cache, rows=rows,
            cache_position=self.cache_position, suffix_lens=self.suffix_lens,
            group_starts=group_starts, backend=engine.attention_backend)

        def step() -> torch.Tensor:
            hidden = model(inputs_embeds=model.embed(self.tokens)[:, None],
                           position_ids=self.positions[:, None], kv_cache=attention,
                           return_hidden=True)
            return hidden[:, 0] @ weight.T

        self._step = step
        self.graph = None
        if capture:
            # Warm-up runs (Triton compilation, allocator) must happen outside the capture.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    step()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = step()

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, t: int) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        self.cache_position.fill_(t)
        self.suffix_lens.fill_(t + 1)
        if self.graph is None:
            return self._step()
        self.graph.replay()
        return self.logits


def generate(model: torch.nn.Module, prompts: Sequence[Sequence[int] | torch.Tensor],
             sampling: SamplingConfig, *, seed: int = 0, tokenizer: Decoder | None = None,
             engine: RolloutEngine | None = None) -> list[list[int]]:
    """One continuation per prompt (token ids, or embeddings ``[P, hidden]``) through the
    rollout engine at group size 1: what chat, generation and evaluation call. Prompt b draws
    from seed ``seed + b``. Pass an ``engine`` to keep its cache and packed weights across
    calls; otherwise one is built for this call."""
    sampling.validate()
    rows = [p if isinstance(p, torch.Tensor) else torch.as_tensor(list(p), dtype=torch.long)
            for p in prompts]
    if engine is None:
        longest = max((r.shape[0] for r in rows), default=1)
        engine = RolloutEngine(model, max_prompt_len=max(longest, 1),
                               max_new_tokens=sampling.max_new_tokens)
    batch = engine.generate(rows, 1, sampling, seeds=[seed + b for b in range(len(rows))],
                            tokenizer=tokenizer)
    return [group[0] for group in batch.sequences()]
