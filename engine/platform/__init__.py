"""The machine the engine runs on: which device a name means (devices), how many CPU threads torch gets
(cpu_threads), and how busy the machine is with other work (machine_load)."""
