"""Tokenizer: parity with transformers' AutoTokenizer on the converted SmolLM2, sentencepiece
folders, chat-template sandboxing and bad input."""
from __future__ import annotations

import io
import json

import pytest

from rba_core.errors import TokenizerError
from rba_core.weights.prepare import prepare_models
from rba_core.data.tokenizer import Tokenizer

TEXTS = [
    "What is the capital of France?",
    "  leading spaces, tabs\tand\nnewlines\n\n",
    "Numbers 1234567 and 3.14159, dates 2024-05-01.",
    "Unicode: héllo wörld, 日本語, emoji 🤖🎉, Ελληνικά",
    "code: def f(x):\n    return x ** 2  # squared",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "don't won't I'm they'll",
    "",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer in one word."},
     {"role": "user", "content": "Capital of Italy?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke about 42."}],
]


@pytest.fixture(scope="module")
def smollm2():
    """The converted SmolLM2 folder (prepared once into the default cache; reruns skip)."""
    return prepare_models(["smollm2-135m-instruct"], progress=False)["smollm2-135m-instruct"]


@pytest.fixture(scope="module")
def both(smollm2):
    from transformers import AutoTokenizer

    return Tokenizer.from_pretrained(smollm2), AutoTokenizer.from_pretrained(smollm2)


@pytest.mark.slow
def test_encode_decode_match_transformers(both):
    ours, theirs = both
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs.encode(text, add_special_tokens=False), text
        assert ours.encode(text, add_special_tokens=True) == theirs.encode(text), text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), text
        assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids), text
    assert ours.decode(ours.encode(TEXTS[3])) == TEXTS[3]


@pytest.mark.slow
def test_chat_template_matches_transformers(both):
    ours, theirs = both
    for messages in CONVERSATIONS:
        for generation_prompt in (True, False):
            assert ours.apply_chat_template(messages, add_generation_prompt=generation_prompt) == \
                theirs.apply_chat_template(messages, tokenize=False,
                                           add_generation_prompt=generation_prompt)
    rendered = ours.apply_chat_template(CONVERSATIONS[0])
    assert rendered.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert rendered.endswith("<|im_start|>assistant\n")


@pytest.mark.slow
def test_special_tokens_of_smollm2(both):
    ours, theirs = both
    assert ours.bos_id == 1 and ours.eos_id == 2
    assert ours.token_to_id("<|im_start|>") == 1 and ours.token_to_id("<|im_end|>") == 2
    assert ours.stop_ids[0] == 2 and set(ours.stop_ids) <= {0, 2}
    assert ours.vocab_size == len(theirs) == 49152
    assert ours.get_vocab() == theirs.get_vocab()


@pytest.mark.slow
def test_same_vocabulary(smollm2, tmp_path):
    first = Tokenizer.from_pretrained(smollm2)
    assert first.same_vocabulary(Tokenizer.from_pretrained(smollm2))
    data = json.loads((smollm2 / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    # Two tokens trade ids: same strings, different vocabulary.
    vocab["the"], vocab["ing"] = vocab["ing"], vocab["the"]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    assert not first.same_vocabulary(Tokenizer.from_pretrained(tmp_path))


def _write_folder(tmp_path, template: str | None, **config):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    tokenizer = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(["<s>", "</s>"])
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    settings = {"bos_token": "<s>", "eos_token": {"__type": "AddedToken", "content": "</s>"}, **config}
    if template is not None:
        settings["chat_template"] = template
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(settings))
    return tmp_path


def test_template_globals_and_filters_like_transformers(tmp_path):
    template = (
        "{{ bos_token }}{% for m in messages %}"
        "{% if m.role not in ['user', 'assistant'] %}{{ raise_exception('bad role ' + m.role) }}"
        "{% endif %}{% if loop.index > 2 %}{% break %}{% endif %}"
        "{{ m.role }}: {{ m.content | tojson }}\n{% endfor %}"
        "{% generation %}{{ eos_token }}{% endgeneration %}"
    )
    folder = _write_folder(tmp_path, template)
    tokenizer = Tokenizer.from_pretrained(folder)
    messages = [{"role": "user", "content": "héllo \"x\""}, {"role": "assistant", "content": "<b>"},
                {"role": "user", "content": "dropped by break"}]
    rendered = tokenizer.apply_chat_template(messages)
    assert rendered == '<s>user: "héllo \\"x\\""\nassistant: "<b>"\n</s>'
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(folder)
    assert rendered == reference.apply_chat_template(messages, tokenize=False)
    with pytest.raises(TokenizerError, match="bad role system"):
        tokenizer.apply_chat_template([{"role": "system", "content": "x"}])


def test_template_is_sandboxed(tmp_path):
    from jinja2.exceptions import SecurityError

    for template in ("{{ messages.append({'role': 'x'}) }}",
                     "{{ messages.__class__.__mro__[1].__subclasses__() }}"):
        folder = _write_folder(tmp_path, template)
        # A user error (the folder's template), named with the fix: one line at the CLI.
        with pytest.raises(TokenizerError, match="was refused by the sandbox.*tokenizer_config"
                           ) as raised:
            Tokenizer.from_pretrained(folder).apply_chat_template(
                [{"role": "user", "content": "a"}])
        assert isinstance(raised.value.__cause__, SecurityError)


@pytest.mark.parametrize("template, bound", [
    # Loops that output nothing: only the clock stops them.
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
     "ran past 0.5 s"),
    ("{% set big %}{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}"
     "{% endfor %}{% endset %}{{ big }}", "ran past 0.5 s"),
    # Output faster than any clock: the size bound.
    ("{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}",
     "produced more than 1000000 characters"),
    # One C call building a huge value, which nothing could interrupt: refused before it runs.
    ("{{ 'x' * 10000000000 }}", "repeats a value 10000000000 times"),
    ("{{ 10 ** 1000000000 }}", "computes 10 \\*\\* 1000000000"),
])
def test_a_runaway_template_is_stopped_within_its_bound(tmp_path, template, bound):
    import sys
    import time
    import tracemalloc

    tokenizer = Tokenizer.from_pretrained(_write_folder(tmp_path, template))
    tokenizer.template_seconds = 0.5
    tokenizer.template_max_chars = 1_000_000
    tracer = sys.gettrace()
    tracemalloc.start()
    try:
        start = time.perf_counter()
        with pytest.raises(TokenizerError, match=f"chat template of .* {bound}.*chat_template"):
            tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < 0.5 + 1.0 and peak < 16 * 2**20
    # The rendering's trace function is gone and whatever was there before is back.
    assert sys.gettrace() is tracer
    # The defaults bound every tokenizer, and an ordinary template renders unhindered.
    assert Tokenizer.template_seconds == 2.0 and Tokenizer.template_max_chars == 16_000_000
    ok = Tokenizer.from_pretrained(_write_folder(tmp_path, "{{ messages[0].content * 3 }}"))
    assert ok.apply_chat_template([{"role": "user", "content": "ab"}]) == "ababab"


def test_chat_template_jinja_file(tmp_path):
    folder = _write_folder(tmp_path, None)
    (folder / "chat_template.jinja").write_text("{% for m in messages %}[{{ m.content }}]{% endfor %}")
    assert Tokenizer.from_pretrained(folder).apply_chat_template(
        [{"role": "user", "content": "hello"}]) == "[hello]"


def test_bad_folders_and_messages(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        Tokenizer.from_pretrained(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match=r"empty has no tokenizer.*tokenizer.json.*tokenizer.model"):
        Tokenizer.from_pretrained(tmp_path / "empty")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path / "broken")
    folder = _write_folder(tmp_path / "empty", None)
    tokenizer = Tokenizer.from_pretrained(folder)
    with pytest.raises(TokenizerError, match="no chat template"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    folder = _write_folder(tmp_path / "empty", "{{ messages[0].content }}")
    with pytest.raises(TokenizerError, match="'role' and 'content'"):
        Tokenizer.from_pretrained(folder).apply_chat_template([{"text": "hi"}])
    with pytest.raises(TokenizerError, match="expects a string"):
        tokenizer.encode(["hello"])


@pytest.fixture(scope="module")
def sentencepiece_folder(tmp_path_factory):
    import sentencepiece

    corpus = [
        "the quick brown fox jumps over the lazy dog",
        "a speech model follows spoken instructions",
        "hello world, hello there, general kenobi",
        "numbers like 12 and 345 appear too",
    ] * 20
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, vocab_size=80, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
        minloglevel=2,
    )
    folder = tmp_path_factory.mktemp("sp")
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
        "added_tokens_decoder": {"80": {"content": "<|eot|>", "special": True}},
        "chat_template": "{% for m in messages %}{{ bos_token }}{{ m.content }}<|eot|>{% endfor %}",
    }))
    return folder


def test_sentencepiece_folder(sentencepiece_folder):
    import sentencepiece

    reference = sentencepiece.SentencePieceProcessor(
        model_file=str(sentencepiece_folder / "tokenizer.model"))
    tokenizer = Tokenizer.from_pretrained(sentencepiece_folder)
    text = "the lazy fox follows hello world"
    ids = tokenizer.encode(text)
    assert ids == reference.encode(text)
    assert tokenizer.encode(text, add_special_tokens=True) == [1, *ids]
    assert tokenizer.decode(ids) == text
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.vocab_size) == (1, 2, 81)
    assert tokenizer.stop_ids == [2]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hello world"}])
    assert prompt == "<s>hello world<|eot|>"
    encoded = tokenizer.encode(prompt)
    assert encoded == [1, *reference.encode("hello world"), 80]
    assert tokenizer.decode(encoded) == "hello world"
    assert tokenizer.decode(encoded, skip_special_tokens=False) == "<s>hello world<|eot|>"
    assert tokenizer.same_vocabulary(Tokenizer.from_pretrained(sentencepiece_folder))
