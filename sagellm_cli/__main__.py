from sagellm_cli.cli.app import main

main()
