"""The LLM policy: prompts, the chat-completions client and its budgets, audit records, tools."""

from agent.policy.llm.client import LLMSettings
from agent.policy.llm.completion import MAX_NESTING, MAX_REPLY_BYTES, Completion, nesting_depth
from agent.policy.llm.conversation import MAX_INSPECTIONS
from agent.policy.llm.policy import LLMPolicy
from agent.policy.llm.prompts import (
    PROMPT_NAMES,
    PromptError,
    Prompts,
    load_prompts,
    prompts_folder,
)
from agent.policy.llm.records import DecisionTrace
from agent.policy.llm.tools import DECISION_TOOLS, INSPECTION_TOOLS, DecisionTool

__all__ = [
    "DECISION_TOOLS",
    "INSPECTION_TOOLS",
    "MAX_INSPECTIONS",
    "MAX_NESTING",
    "MAX_REPLY_BYTES",
    "PROMPT_NAMES",
    "Completion",
    "DecisionTool",
    "DecisionTrace",
    "LLMPolicy",
    "LLMSettings",
    "PromptError",
    "Prompts",
    "load_prompts",
    "nesting_depth",
    "prompts_folder",
]
