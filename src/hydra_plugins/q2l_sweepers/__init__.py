"""q2l's Hydra plugins. Hydra imports every module under `hydra_plugins` when an app starts, so
what is here stays cheap to import; the sweepers load Optuna only when a sweep runs."""
