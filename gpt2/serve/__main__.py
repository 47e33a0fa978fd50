from gpt2.serve.cli import main

main()
