"""The scan: configuration, the LangGraph graph and its nodes, the runner, results, limits."""
