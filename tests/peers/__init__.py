"""Real peer servers for the tests (llama.cpp), each in its own venv, found at test time."""
