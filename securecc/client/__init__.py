"""The client side: the per-compile job, the agent that keeps sessions open, host choice, tickets."""
