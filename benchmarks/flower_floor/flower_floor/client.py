"""A ClientApp that replies with the content it received, importing nothing beyond Flower."""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def echo(message: Message, context: Context) -> Message:
    """The request's content, sent back."""
    return Message(message.content, reply_to=message)
