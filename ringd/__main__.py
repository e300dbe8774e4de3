from ringd.daemon_cli import main

if __name__ == "__main__":
    main()
