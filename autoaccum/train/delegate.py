"""An attribute kept on another object: one home for a value two objects show."""

from __future__ import annotations

from typing import Any, Generic, TypeVar, cast, overload

__all__ = ["Delegated"]

T = TypeVar("T")


class Delegated(Generic[T]):
    """A class attribute whose value lives on the instance's ``holder`` attribute (the
    accumulator's model, optimizer, … live on its window trainer): reading and setting it
    reads and sets the holder's attribute of the same name."""

    def __init__(self, holder: str) -> None:
        self.holder = holder

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, obj: None, owner: type) -> Delegated[T]: ...

    @overload
    def __get__(self, obj: object, owner: type) -> T: ...

    def __get__(self, obj: object | None, owner: type) -> T | Delegated[T]:
        if obj is None:
            return self
        return cast(T, getattr(getattr(obj, self.holder), self.name))

    def __set__(self, obj: Any, value: T) -> None:
        setattr(getattr(obj, self.holder), self.name, value)
