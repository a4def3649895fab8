"""A SandboxFusion-compatible code execution service: fast (fork from a warm interpreter) and hardened."""
