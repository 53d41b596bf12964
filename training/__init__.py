"""Astrea's training recipe (progressive pre-alignment, instruction tuning). Installed as `astrea.training`."""
