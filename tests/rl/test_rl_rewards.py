"""Rewards: the text metrics against sacrebleu and SQuAD's rules, the log-prob rewards against
float64 formulas, combine_rewards' weighting, and the external reward's failure messages."""
import textwrap

import pytest
import sacrebleu
import torch

from rba_core.errors import ConfigError
from rba_core.rl import (
    REWARD_NAMES, Experience, RewardSpec, bleu, chrf, combine_rewards, dense_behavior_reward,
    exact_match, load_external_reward, normalize_answer, sequence_teacher_likelihood, token_f1,
)

HYP = "The quick brown fox jumps over the lazy dog."
REF = "A quick brown fox jumped over the lazy dog!"
OTHER_REF = "The fast brown fox leaps over a lazy dog."


def test_chrf_and_bleu_are_sacrebleu_sentence_scores_over_100():
    assert chrf(HYP, REF) == sacrebleu.sentence_chrf(HYP, [REF]).score / 100
    assert bleu(HYP, REF) == sacrebleu.sentence_bleu(HYP, [REF]).score / 100
    refs = [REF, OTHER_REF]
    assert chrf(HYP, refs) == sacrebleu.sentence_chrf(HYP, refs).score / 100
    assert bleu(HYP, refs) == sacrebleu.sentence_bleu(HYP, refs).score / 100
    assert 0 < bleu(HYP, REF) < chrf(HYP, REF) < 1
    assert chrf(REF, REF) == pytest.approx(1.0) and bleu(REF, REF) == pytest.approx(1.0)
    assert bleu("zebra", "the lazy dog") == 0.0 and chrf("", REF) == 0.0


def test_squad_normalisation_and_exact_match():
    # SQuAD's script deletes punctuation (no space), so the hyphen joins the words.
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("The theater, an  Opera") == "theater opera"
    assert exact_match("The  Eiffel Tower!", "eiffel tower") == 1.0
    assert exact_match("The  Eiffel-Tower!", "eiffel tower") == 0.0
    assert exact_match("The  Eiffel-Tower!", ["eiffel tower", "Eiffel-tower"]) == 1.0
    assert exact_match("", "Paris") == 0.0


def test_token_f1():
    assert token_f1("the big red Eiffel Tower", "eiffel tower") == pytest.approx(2 / 3)
    assert token_f1("An apple a day", "apple, day.") == 1.0
    assert token_f1("Paris", ["London", "paris, France"]) == pytest.approx(2 / 3)
    assert token_f1("The  Eiffel-Tower!", "eiffel tower") == 0.0
    assert token_f1("the", "a") == 1.0  # both empty after normalisation: SQuAD v2 says match
    assert token_f1("Paris", "the") == 0.0
    with pytest.raises(ConfigError, match="references"):
        token_f1("x", [])


def make_experience(batch=2, group=3, length=5, **fields):
    lengths = torch.randint(1, length + 1, (batch, group))
    lengths[0, 0] = 0  # an empty response
    mask = torch.arange(length) < lengths[..., None]
    return Experience(
        tokens=torch.randint(0, 50, (batch, group, length)), mask=mask,
        old_logprobs=-torch.rand(batch, group, length) * 3,
        teacher_logprobs=-torch.rand(batch, group, length) * 3, **fields)


def test_dense_reward_and_teacher_likelihood_match_float64():
    exp = make_experience()
    teacher, old, mask = exp.teacher_logprobs, exp.old_logprobs, exp.mask
    dense = dense_behavior_reward(teacher, old, mask)
    want = (teacher.double() - old.double()) * mask
    torch.testing.assert_close(dense.double(), want, rtol=1e-6, atol=1e-6)
    likelihood = sequence_teacher_likelihood(teacher, mask)
    want_seq = torch.tensor([[teacher[b, g][mask[b, g]].double().mean().item()
                              if mask[b, g].any() else 0.0 for g in range(3)] for b in range(2)],
                            dtype=torch.float64)
    torch.testing.assert_close(likelihood.double(), want_seq, rtol=1e-6, atol=1e-6)
    assert likelihood[0, 0] == 0.0


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        import math
        def length(rows, responses, group):
            return [len(text) + 10 * g for text, g in zip(responses, group)]
        def too_few(rows, responses, group):
            return [0.0] * (len(responses) - 1)
        def nan_at_4(rows, responses, group):
            return [math.nan if i == 4 else 1.0 for i in range(len(responses))]
        def text_score(rows, responses, group):
            return ["high"] * len(responses)
        def broken(rows, responses, group):
            raise RuntimeError("reward server down")
        def scalar(rows, responses, group):
            return 1.0
        class Scorer:
            @staticmethod
            def score(rows, responses, group):
                return [float(row["id"]) for row in rows]
        NOT_CALLABLE = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_rewards"


def test_combine_rewards_weights_and_components(reward_module):
    rows = [{"id": 7, "response": "the lazy dog", "answers": ["dog", "a hound"]},
            {"id": 9, "response": "a quick fox", "answers": ["fox"]}]
    responses = [["", "the dog", "lazy dog"], ["a quick fox", "fox!", "foxes"]]
    exp = make_experience(metadata=rows)
    specs = [RewardSpec("dense", weight=0.5), RewardSpec("teacher_likelihood", weight=2.0),
             RewardSpec("exact_match", reference_key="answers"), RewardSpec("chrf", weight=0.25),
             RewardSpec("external", weight=-0.1, function=f"{reward_module}:length"),
             RewardSpec("external", function=f"{reward_module}:Scorer.score")]
    rewards = combine_rewards(specs, exp, responses)

    dense = dense_behavior_reward(exp.teacher_logprobs, exp.old_logprobs, exp.mask)
    torch.testing.assert_close(rewards.token, 0.5 * dense)
    em = torch.tensor([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    ch = torch.tensor([[chrf(t, row["response"]) for t in texts]
                       for row, texts in zip(rows, responses)])
    length = torch.tensor([[len(t) + 10 * b for t in texts] for b, texts in enumerate(responses)],
                          dtype=torch.float32)
    ids = torch.tensor([[7.0] * 3, [9.0] * 3])
    likelihood = sequence_teacher_likelihood(exp.teacher_logprobs, exp.mask)
    want = 2.0 * likelihood + em + 0.25 * ch - 0.1 * length + ids
    torch.testing.assert_close(rewards.sequence, want)
    assert set(rewards.components) == {
        "dense", "teacher_likelihood", "exact_match", "chrf",
        f"external:{reward_module}:length", f"external:{reward_module}:Scorer.score"}
    torch.testing.assert_close(rewards.components["exact_match"], em)
    torch.testing.assert_close(rewards.components["dense"],
                               dense.sum(-1) / exp.mask.sum(-1).clamp(min=1))


def test_only_token_rewards_leave_sequence_none():
    rewards = combine_rewards([RewardSpec("dense")], make_experience())
    assert rewards.sequence is None and rewards.token is not None


def test_unknown_reward_lists_the_known_ones():
    with pytest.raises(ConfigError) as info:
        RewardSpec("rouge")
    assert "rouge" in str(info.value)
    assert all(name in str(info.value) for name in REWARD_NAMES)


def test_reward_spec_checks():
    with pytest.raises(ConfigError, match="weight"):
        RewardSpec("chrf", weight=float("inf"))
    with pytest.raises(ConfigError, match="function="):
        RewardSpec("external")
    with pytest.raises(ConfigError, match="only 'external'"):
        RewardSpec("bleu", function="x:y")
    with pytest.raises(ConfigError, match="more than once"):
        combine_rewards([RewardSpec("bleu"), RewardSpec("bleu", weight=2)], make_experience(),
                        [["x"] * 3] * 2)


def test_missing_inputs_are_named():
    exp = make_experience(metadata=[{"response": "a"}, {"text": "b"}])
    with pytest.raises(ConfigError, match="responses="):
        combine_rewards([RewardSpec("bleu")], exp)
    with pytest.raises(ConfigError, match=r"'response'.*row 1"):
        combine_rewards([RewardSpec("bleu")], exp, [["a"] * 3] * 2)
    with pytest.raises(ValueError, match="2 lists of 3"):
        combine_rewards([RewardSpec("bleu")], exp, [["a"] * 2] * 2)
    no_teacher = Experience(exp.tokens, exp.mask, exp.old_logprobs)
    with pytest.raises(ConfigError, match="teacher_logprobs"):
        combine_rewards([RewardSpec("dense")], no_teacher)


@pytest.mark.parametrize("function, message", [
    ("too_few", r"returned 5 scores for 6 responses"),
    ("nan_at_4", r"returned nan for row 4 \(group 1\)"),
    ("text_score", r"returned 'high' for row 0"),
    ("broken", r"raised RuntimeError: reward server down"),
    ("scalar", r"must return a sequence"),
])
def test_external_reward_errors_name_the_callable_and_row(reward_module, function, message):
    target = f"{reward_module}:{function}"
    spec = RewardSpec("external", function=target)
    with pytest.raises(ConfigError, match=message) as info:
        combine_rewards([spec], make_experience(), [["a", "b", "c"]] * 2)
    assert target in str(info.value)


@pytest.mark.parametrize("target, message", [
    ("no_such_module_rba:f", "cannot import module 'no_such_module_rba'"),
    ("{mod}:missing", "has no attribute 'missing'"),
    ("{mod}:NOT_CALLABLE", "not a callable"),
    ("{mod}", "'module:function'"),
    (":f", "'module:function'"),
])
def test_loading_bad_external_reward(reward_module, target, message):
    target = target.format(mod=reward_module)
    with pytest.raises(ConfigError, match=message) as info:
        load_external_reward(target)
    assert repr(target) in str(info.value)
    with pytest.raises(ConfigError, match=message):
        RewardSpec("external", function=target)  # fails when the config is read
