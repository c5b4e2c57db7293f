"""Tokenizers and chat templates of Hugging Face-layout checkpoints, without ``transformers``.

A folder holds either ``tokenizer.json`` (run by the ``tokenizers`` library) or a sentencepiece
``tokenizer.model``; ``tokenizer_config.json`` names the BOS/EOS and special tokens and carries
the chat template (newer checkpoints keep the template in ``chat_template.jinja``). Templates
are rendered in a sandboxed jinja2 environment set up like the one ``transformers`` uses, so a
checkpoint's template gives the same prompt string here as there.
"""
from __future__ import annotations

import json
import re
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

from rba_core.errors import TokenizerError

# Special tokens that end an assistant turn in common chat formats (ChatML, Llama 3, Gemma,
# Phi); any of them present as a special token of the vocabulary is a stop id.
END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_turn|>",
    "<end_of_turn>",
    "<|end|>",
    "<|endoftext|>",
    "</s>",
)

SPECIAL_TOKEN_KEYS = (
    "bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token",
)


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes a token either as a string or as an AddedToken dict."""
    if value is None:
        return None
    if isinstance(value, dict):
        return value.get("content")
    return str(value)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TokenizerError(f"{path} is not readable JSON: {error}") from error


class _TokenizersBackend:
    """``tokenizer.json`` through the ``tokenizers`` library."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self._tk = HFTokenizer.from_file(str(path))
        except Exception as error:  # noqa: BLE001 - the library raises bare Exceptions
            raise TokenizerError(
                f"{path} cannot be loaded by the tokenizers library: {error}"
            ) from error
        added = self._tk.get_added_tokens_decoder()
        self.special = {i: t.content for i, t in added.items() if t.special}

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self._tk.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self._tk.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    def vocab(self) -> dict[str, int]:
        return self._tk.get_vocab(with_added_tokens=True)

    def size(self) -> int:
        return self._tk.get_vocab_size(with_added_tokens=True)


class _SentencePieceBackend:
    """A sentencepiece ``tokenizer.model`` plus the added tokens of tokenizer_config.json.

    sentencepiece does not know added tokens, so text is split on them first and each piece in
    between is encoded on its own (what the ``transformers`` slow tokenizers do).
    """

    def __init__(self, path: Path, config: dict[str, Any]):
        import sentencepiece

        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.Load(str(path))
        except (OSError, RuntimeError) as error:
            raise TokenizerError(f"{path} is not a sentencepiece model: {error}") from error
        pieces = self._sp.GetPieceSize()
        self.special = {
            i: self._sp.IdToPiece(i)
            for i in range(pieces)
            if self._sp.IsControl(i) or self._sp.IsUnknown(i)
        }
        # Control pieces (<s>, </s>) and <unk> written in text, as chat templates do, must map
        # to their ids; sentencepiece alone would spell them out as characters.
        self._added: dict[str, int] = {piece: index for index, piece in self.special.items()}
        for key, entry in (config.get("added_tokens_decoder") or {}).items():
            content = _token_text(entry)
            if content is None:
                continue
            index = int(key)
            if index < pieces and self._sp.IdToPiece(index) == content:
                # A piece sentencepiece knows already; listing it as added only marks it special.
                if isinstance(entry, dict) and entry.get("special", True):
                    self.special[index] = content
                self._added[content] = index
                continue
            self._added[content] = index
            if not isinstance(entry, dict) or entry.get("special", True):
                self.special[index] = content
        self._id_to_added = {index: text for text, index in self._added.items()}
        self.add_bos = bool(config.get("add_bos_token", True))
        self.add_eos = bool(config.get("add_eos_token", False))
        self.bos_id = self._sp.bos_id()
        self.eos_id = self._sp.eos_id()
        ordered = sorted(self._added, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, ordered)) + ")") if ordered else None

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        ids: list[int] = []
        parts = self._split.split(text) if self._split else [text]
        for part in parts:
            if part in self._added:
                ids.append(self._added[part])
            elif part:
                ids.extend(self._sp.EncodeAsIds(part))
        if add_special_tokens:
            if self.add_bos and self.bos_id >= 0:
                ids.insert(0, self.bos_id)
            if self.add_eos and self.eos_id >= 0:
                ids.append(self.eos_id)
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        out: list[str] = []
        run: list[int] = []
        for index in ids:
            special = index in self.special or index in self._id_to_added
            if not special:
                run.append(index)
                continue
            if run:
                out.append(self._sp.DecodeIds(run))
                run = []
            if not skip_special_tokens or index not in self.special:
                out.append(self._id_to_added.get(index) or self._sp.IdToPiece(index))
        if run:
            out.append(self._sp.DecodeIds(run))
        return "".join(out)

    def token_to_id(self, token: str) -> int | None:
        if token in self._added:
            return self._added[token]
        index = self._sp.PieceToId(token)
        # PieceToId answers unknown pieces with the unk id.
        if index == self._sp.unk_id() and token != self._sp.IdToPiece(index):
            return None
        return index

    def vocab(self) -> dict[str, int]:
        table = {self._sp.IdToPiece(i): i for i in range(self._sp.GetPieceSize())}
        table.update(self._added)
        return table

    def size(self) -> int:
        return max(self._sp.GetPieceSize(), max(self._id_to_added, default=-1) + 1)


def _generation_tag_extension() -> type:
    """``{% generation %}...{% endgeneration %}`` marks assistant text for training masks in
    some templates; for rendering the body is output unchanged."""
    from jinja2 import nodes
    from jinja2.ext import Extension

    class GenerationTag(Extension):
        tags = {"generation"}

        def parse(self, parser):  # type: ignore[no-untyped-def]
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    return GenerationTag


# A checkpoint's chat template is code from whoever made the folder. The sandbox keeps it
# from touching anything but its arguments; these keep it from running or growing without end.
# Real templates render in well under a millisecond and produce the prompt, so both are far
# beyond any legitimate use.
TEMPLATE_SECONDS = 2.0
TEMPLATE_MAX_CHARS = 16_000_000
# Integers a template raises to powers stay this small (a huge ``**`` runs in C, uninterruptible).
_MAX_POWER_BITS = 4096


class _OverBound(BaseException):
    """A rendering went past a bound. A BaseException, so that no ``except Exception`` inside
    jinja's runtime can swallow it (after raising, the trace function is unset, so a swallowed
    one would let the loop run on unchecked)."""


def _sandbox_class() -> type:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        """The sandbox ``transformers`` renders templates in, plus size checks on the operators
        that build a huge value in one C call, where no time limit can interrupt them: string
        and list repetition (``'x' * n``) and powers."""

        intercepted_binops = frozenset({"*", "**"})
        max_chars = TEMPLATE_MAX_CHARS

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            if operator == "*":
                for sequence, count in ((left, right), (right, left)):
                    if isinstance(sequence, (str, list, tuple)) and isinstance(count, int) \
                            and len(sequence) * count > self.max_chars:
                        raise _OverBound(f"repeats a value {count} times, past the "
                                         f"{self.max_chars}-character bound")
            elif operator == "**" and isinstance(left, int) and isinstance(right, int) \
                    and right > 0 and abs(left) > 1 \
                    and right * abs(left).bit_length() > _MAX_POWER_BITS:
                raise _OverBound(f"computes {left} ** {right}, a number too large for any "
                                 "prompt")
            return super().call_binop(context, operator, left, right)

    return BoundedSandbox


def _compile_template(source: str) -> Any:
    import jinja2.ext

    def raise_exception(message: str) -> None:
        raise TokenizerError(f"the chat template refused the messages: {message}")

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        # jinja's own tojson escapes HTML characters and sorts keys; chat templates expect
        # plain json.dumps output, as transformers renders it.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)

    def strftime_now(format: str) -> str:
        return datetime.now().strftime(format)

    env = _sandbox_class()(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols, _generation_tag_extension()],
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


def _render_bounded(template: Any, variables: dict[str, Any], *, seconds: float,
                    max_chars: int) -> str:
    """``template`` rendered with ``variables``, stopped (``_OverBound``) once it has run
    ``seconds`` or produced ``max_chars`` characters.

    The time limit is a trace function on this thread for the rendering's duration: the
    template's compiled code and jinja's runtime are Python, so every line they run checks the
    clock, including loops that output nothing. Any tracer already set (a debugger, coverage) is
    put back afterwards."""
    deadline = time.monotonic() + seconds

    def check(frame: Any, event: str, arg: Any) -> Any:
        if time.monotonic() > deadline:
            raise _OverBound(f"ran past {seconds:g} s without finishing (a loop that does not "
                             "end?)")
        return check

    template.environment.max_chars = max_chars
    pieces: list[str] = []
    produced = 0
    previous = sys.gettrace()
    stream = template.generate(**variables)
    sys.settrace(check)
    try:
        for piece in stream:
            produced += len(piece)
            if produced > max_chars:
                raise _OverBound(f"produced more than {max_chars} characters without finishing "
                                 "(a loop that does not end?)")
            pieces.append(piece)
    finally:
        sys.settrace(previous)
        stream.close()
    return "".join(pieces)


class Tokenizer:
    """A checkpoint's tokenizer: encode/decode, special tokens, stop ids and chat template.

    ``template_seconds`` and ``template_max_chars`` bound one rendering of the chat template
    (class defaults ``TEMPLATE_SECONDS`` and ``TEMPLATE_MAX_CHARS``; set them on an instance
    to change its own)."""

    template_seconds: float = TEMPLATE_SECONDS
    template_max_chars: int = TEMPLATE_MAX_CHARS

    def __init__(
        self,
        backend: _TokenizersBackend | _SentencePieceBackend,
        config: dict[str, Any],
        folder: Path,
        chat_template: str | None,
        extra_stop_ids: Iterable[int] = (),
    ):
        self._backend = backend
        self.config = config
        self.folder = folder
        self.chat_template = chat_template
        self._compiled: Any = None
        self.special_tokens: dict[str, str] = {}
        for key in SPECIAL_TOKEN_KEYS:
            text = _token_text(config.get(key))
            if text is not None:
                self.special_tokens[key] = text
        self.bos_token = self.special_tokens.get("bos_token")
        self.eos_token = self.special_tokens.get("eos_token")
        self.bos_id = self._id_of(self.bos_token)
        self.eos_id = self._id_of(self.eos_token)
        if isinstance(backend, _SentencePieceBackend):
            if self.bos_id is None and backend.bos_id >= 0:
                self.bos_id = backend.bos_id
            if self.eos_id is None and backend.eos_id >= 0:
                self.eos_id = backend.eos_id
        self.pad_id = self._id_of(self.special_tokens.get("pad_token"))
        stops = [] if self.eos_id is None else [self.eos_id]
        special_ids = set(backend.special)
        for token in END_OF_TURN_TOKENS:
            index = backend.token_to_id(token)
            if index is not None and index in special_ids:
                stops.append(index)
        stops.extend(int(i) for i in extra_stop_ids)
        self.stop_ids: list[int] = list(dict.fromkeys(stops))

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "Tokenizer":
        """Load the tokenizer of a Hugging Face-layout checkpoint folder."""
        root = Path(folder)
        if not root.is_dir():
            raise TokenizerError(f"tokenizer folder {root} does not exist or is not a folder")
        config_path = root / "tokenizer_config.json"
        config = _read_json(config_path) if config_path.is_file() else {}
        if (root / "tokenizer.json").is_file():
            backend: _TokenizersBackend | _SentencePieceBackend = _TokenizersBackend(
                root / "tokenizer.json"
            )
        elif (root / "tokenizer.model").is_file():
            backend = _SentencePieceBackend(root / "tokenizer.model", config)
        else:
            raise TokenizerError(
                f"{root} has no tokenizer: it needs tokenizer.json (Hugging Face tokenizers) or "
                "tokenizer.model (sentencepiece), plus tokenizer_config.json for the chat "
                "template and special tokens"
            )
        template = config.get("chat_template")
        if isinstance(template, list):
            named = {entry.get("name"): entry.get("template") for entry in template}
            template = named.get("default") or next(iter(named.values()), None)
        jinja_file = root / "chat_template.jinja"
        if template is None and jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        extra_stops: list[int] = []
        generation_path = root / "generation_config.json"
        if generation_path.is_file():
            eos = _read_json(generation_path).get("eos_token_id")
            extra_stops = [eos] if isinstance(eos, int) else list(eos or [])
        return cls(backend, config, root, template, extra_stops)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (the model's embedding may be larger)."""
        return self._backend.size()

    def get_vocab(self) -> dict[str, int]:
        return self._backend.vocab()

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; special tokens written in the text map to their ids."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects a string, got {type(text).__name__}")
        return self._backend.encode(text, add_special_tokens)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> str:
        """Render ``messages`` (dicts with 'role' and 'content') with the checkpoint's template."""
        if self.chat_template is None:
            raise TokenizerError(
                f"{self.folder} has no chat template: add 'chat_template' to "
                "tokenizer_config.json (or a chat_template.jinja file)"
            )
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and "role" in m and "content" in m for m in messages
        ):
            raise TokenizerError(
                "messages must be a list of dicts with 'role' and 'content', for example "
                "[{'role': 'user', 'content': 'Hello'}]"
            )
        if self._compiled is None:
            from jinja2 import TemplateError

            try:
                self._compiled = _compile_template(self.chat_template)
            except TemplateError as error:
                raise TokenizerError(
                    f"the chat template of {self.folder} does not compile: {error}"
                ) from error
        variables = dict(self.special_tokens)
        variables.update(template_kwargs)
        variables.update(messages=messages, add_generation_prompt=add_generation_prompt)
        fix = "fix or replace 'chat_template' in tokenizer_config.json (or chat_template.jinja)"
        try:
            return _render_bounded(self._compiled, variables, seconds=self.template_seconds,
                                   max_chars=self.template_max_chars)
        except TokenizerError:
            raise  # the template's own raise_exception: it refuses these messages
        except _OverBound as error:
            raise TokenizerError(f"the chat template of {self.folder} {error}; {fix}") from None
        except Exception as error:  # noqa: BLE001 - the template is the folder's code, not ours
            from jinja2.exceptions import SecurityError

            what = "was refused by the sandbox" if isinstance(error, SecurityError) else \
                f"failed ({type(error).__name__})"
            raise TokenizerError(f"the chat template of {self.folder} {what}: {error}; a chat "
                                 f"template may only read its arguments and format text: {fix}"
                                 ) from error

    def same_vocabulary(self, other: "Tokenizer") -> bool:
        """True when both map every token to the same id (a teacher can score a student's ids)."""
        return self.get_vocab() == other.get_vocab()
