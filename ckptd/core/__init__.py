"""Pure domain: records, ranking, retention rules, the recording diff. Imports nothing of ckptd."""
