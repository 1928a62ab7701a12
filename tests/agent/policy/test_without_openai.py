"""`agent.policy` works without openai: only `agent.policy.llm` needs it (as iminuit's
tests/test_without_scipy.py checks its optional extra), so the rules and gates import fast and
a scan with the default policy never loads the LLM client."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]

SCRIPT = """
import sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("openai", "httpx2"):
            raise ImportError(f"{name} is blocked by the test")

sys.meta_path.insert(0, Block())
import agent.policy
proposal = agent.policy.RulesPolicy().initial_points((0.1, 10.0), 1)
print(len(proposal.points_pb))
try:
    import agent.policy.llm
except ImportError as error:
    print(error)
"""


def test_the_rules_and_gates_import_and_decide_without_openai() -> None:
    completed = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        env=os.environ | {"PYTHONPATH": str(REPO)},
        cwd=REPO,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    points, refusal = completed.stdout.splitlines()
    assert points == "3"
    assert refusal.endswith("is blocked by the test")  # agent.policy.llm does need openai
