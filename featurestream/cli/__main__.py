from featurestream.cli import main

main()
