package dev.gemmaaot.core

/** What the chat screen shows. Immutable: every change makes a new value the UI observes. */
data class ChatState(
    val messages: List<ChatMessage> = emptyList(),
    /** The reply being streamed (not yet in [messages]); null when not generating. */
    val streaming: String? = null,
    val error: String? = null,
    val lastStats: String? = null,
) {
    val generating: Boolean get() = streaming != null
}

/** One reply to generate: [prompt] is what the model must see, [engineInput] what to hand a fresh
 *  LiteRT-LM Session for that (see [GemmaTemplate.sessionInput]). */
data class Turn(val id: Int, val prompt: String, val engineInput: String)

/**
 * The chat's logic without Android: history, the prompt for the next turn, assembling the streamed
 * reply, stop, new chat, and the speed readout. The engine adapter calls [onPiece] / [onDone] /
 * [onError] from its callback thread; the UI only reads [state] and calls [send], [stop], [newChat].
 */
class ChatSession(
    private val system: String? = null,
    private val stopStrings: List<String> = listOf(GemmaTemplate.END_OF_TURN),
    clock: () -> Long = System::nanoTime,
    private val listener: (ChatState) -> Unit = {},
) {
    private val lock = Any()
    private val stats = TokenStats(clock)
    private var stream: StreamText? = null
    private var generation = 0

    var state = ChatState()
        private set

    /** A reply ends after this many streamed pieces (the engine is asked to stop). */
    @Volatile var maxNewTokens: Int = SamplerSettings().maxNewTokens

    private fun update(f: (ChatState) -> ChatState) {
        val s = synchronized(lock) { f(state).also { state = it } }
        listener(s)
    }

    /**
     * Adds the user's turn and returns what to generate, or throws IllegalStateException while a
     * reply is streaming and IllegalArgumentException for empty text.
     */
    fun send(text: String): Turn {
        require(GemmaTemplate.pyStrip(text).isNotEmpty()) { "type a message first" }
        var out: Turn? = null
        update { s ->
            check(!s.generating) { "wait for the reply, or stop it, before sending" }
            val history = s.messages + ChatMessage(Role.USER, text)
            val all = (system?.let { listOf(ChatMessage(Role.SYSTEM, it)) } ?: emptyList()) + history
            generation += 1
            stream = StreamText(stopStrings)
            stats.begin()
            out = Turn(generation, GemmaTemplate.render(all), GemmaTemplate.sessionInput(all))
            s.copy(messages = history, streaming = "", error = null)
        }
        return out!!
    }

    /** A streamed piece of generation [id] (stale generations are ignored). Returns true when a
     *  stop string or [maxNewTokens] ended the reply: the caller should stop the engine. */
    fun onPiece(id: Int, piece: String): Boolean = onStreamed(id) { it.addText(piece) }

    fun onBytes(id: Int, bytes: ByteArray): Boolean = onStreamed(id) { it.addBytes(bytes) }

    private fun onStreamed(id: Int, add: (StreamText) -> String): Boolean {
        var stopped = false
        update { s ->
            val st = stream
            if (id != generation || st == null || !s.generating) return@update s
            stats.token()
            add(st)
            stopped = st.stopped || stats.tokens >= maxNewTokens
            s.copy(streaming = st.text)
        }
        if (stopped) finish(id, null)
        return stopped
    }

    fun onDone(id: Int) = finish(id, null)

    fun onError(id: Int, message: String) = finish(id, message)

    /** The user pressed stop: keep what was generated so far as the reply. */
    fun stop() = finish(generation, null)

    private fun finish(id: Int, error: String?) = update { s ->
        val st = stream
        if (id != generation || st == null || !s.generating) return@update s
        st.finish()
        stream = null
        val reply = st.text
        val messages = when {
            reply.isNotEmpty() -> s.messages + ChatMessage(Role.MODEL, reply)
            error != null -> s.messages.dropLast(1)       // nothing came back: the turn can be retried
            else -> s.messages + ChatMessage(Role.MODEL, "")  // roles must keep alternating
        }
        s.copy(messages = messages, streaming = null, error = error, lastStats = stats.summary())
    }

    fun newChat() = update {
        generation += 1
        stream = null
        ChatState()
    }
}
