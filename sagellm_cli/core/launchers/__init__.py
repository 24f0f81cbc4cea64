"""Where and how an engine process is launched: the Launcher protocol and its local, Ray and external forms, command lines per runtime, process groups, ports and CPU placement."""
