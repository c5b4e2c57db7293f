"""Device names are checked before any work: one line naming the flag and the fix."""
import pytest
import torch

from rba_core.cli import main as cli_main
from rba_core.devices import parse_device
from rba_core.errors import ConfigError


def test_cpu_parses():
    assert parse_device("cpu", "--device") == torch.device("cpu")


@pytest.mark.parametrize("name,fragment", [("banana", "not a device torch knows"),
                                           ("meta", "rba runs on cpu or cuda"),
                                           (3, "must be a device name")])
def test_bad_names_are_refused_naming_the_option(name, fragment):
    with pytest.raises(ConfigError, match=f"--device.*{fragment}|{fragment}"):
        parse_device(name, "--device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine "
                    "without a GPU; on a GPU machine cuda is valid")
def test_cuda_without_a_gpu_says_so():
    with pytest.raises(ConfigError, match="needs a CUDA GPU.*use run.device cpu"):
        parse_device("cuda", "run.device")


@pytest.mark.parametrize("command", [["generate", "--prompt", "hi"],
                                     ["chat", "--audio", "x.wav"]])
def test_the_cli_prints_one_line_for_a_bad_device(command, capsys):
    assert cli_main([*command, "--device", "banana"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--device 'banana'" in err and "Traceback" not in err
