"""``python -m fastkd.ops``: print how the native extension was built."""

from fastkd.ops._extension import build_info


def main() -> None:
    for key, value in build_info().items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()
