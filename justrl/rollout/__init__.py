"""The rollout side: the vLLM engines (client, process, launch, guard, worker extension, CPU server), dispatch over them, and their phases around an update."""
