"""Argument checks shared by the library's pure functions."""


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
  """Raises a ValueError naming the allowed values when `value` is not one."""
  if value not in choices:
    raise ValueError(f"Unknown {name} {value!r}; expected one of "
                     f"{', '.join(choices)}.")
