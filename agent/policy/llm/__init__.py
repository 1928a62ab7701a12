"""The LLM policy: prompts, the chat-completions client and its budgets, audit records."""
