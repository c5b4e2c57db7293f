"""``--suite ifeval``: IFEval's 541 prompts spoken (as Speech-IFEval and VoiceBench's ifeval
split do it), answered with no task prompt, and judged by Google's checker
(``rba_core.eval.ifeval``): prompt-level accuracy (every instruction of the prompt followed)
and instruction-level accuracy (instructions followed / instructions given), each strict and
loose (loose also accepts the answer without its first or last line or without ``*``).
"""
from __future__ import annotations

from rba_core.eval import ifeval
from rba_core.eval.report import Metric
from rba_core.eval.suites import Suite, answer_texts, first, spoken_items


class IFEvalSuite(Suite):
    name = "ifeval"
    metrics = (Metric("prompt_strict", "prompt strict", True, percent=True),
               Metric("instruction_strict", "instruction strict", True, percent=True,
                      weight="instructions"),
               Metric("prompt_loose", "prompt loose", True, percent=True),
               Metric("instruction_loose", "instruction loose", True, percent=True,
                      weight="instructions"))

    def items(self, tokenizer):
        ifeval.checker()     # fail before speaking anything when the checker cannot load
        prompts = first(ifeval.read_prompts(), self.options.limit)
        self.description = (f"IFEval from {ifeval.IFEVAL_DISTRIBUTION}, first {len(prompts)} "
                            f"prompts in file order, spoken by {self.options.engine}")
        return spoken_items(self, [(f"ifeval-{p.key}", p.prompt, "",
                                    {"key": p.key, "instruction_id_list": p.instruction_id_list,
                                     "kwargs": p.kwargs}) for p in prompts])

    def evaluate(self, system, items, context):
        _, texts = answer_texts(system, items, context)
        return [{"answer": text,
                 "scores": ifeval.check(ifeval.IFEvalPrompt(prompt=item.text, **item.gold),
                                        text).scores()}
                for item, text in zip(items, texts)]
