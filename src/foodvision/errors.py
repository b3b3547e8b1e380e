"""One exception type for every failure a user can fix, so stages can print it as one line."""


class FoodVisionError(Exception):
    """A problem with the user's input (params, files, URLs): the message says what to do."""
