package dev.gemmaaot.chat.ui

import androidx.compose.foundation.background
import androidx.compose.foundation.layout.Arrangement
import androidx.compose.foundation.layout.Box
import androidx.compose.foundation.layout.Column
import androidx.compose.foundation.layout.Row
import androidx.compose.foundation.layout.fillMaxSize
import androidx.compose.foundation.layout.fillMaxWidth
import androidx.compose.foundation.layout.imePadding
import androidx.compose.foundation.layout.padding
import androidx.compose.foundation.layout.widthIn
import androidx.compose.foundation.lazy.LazyColumn
import androidx.compose.foundation.lazy.items
import androidx.compose.foundation.lazy.rememberLazyListState
import androidx.compose.foundation.shape.RoundedCornerShape
import androidx.compose.material3.Button
import androidx.compose.material3.ExperimentalMaterial3Api
import androidx.compose.material3.MaterialTheme
import androidx.compose.material3.OutlinedTextField
import androidx.compose.material3.Scaffold
import androidx.compose.material3.Text
import androidx.compose.material3.TextButton
import androidx.compose.material3.TopAppBar
import androidx.compose.runtime.Composable
import androidx.compose.runtime.LaunchedEffect
import androidx.compose.runtime.getValue
import androidx.compose.runtime.mutableStateOf
import androidx.compose.runtime.remember
import androidx.compose.runtime.setValue
import androidx.compose.ui.Alignment
import androidx.compose.ui.Modifier
import androidx.compose.ui.unit.dp
import androidx.lifecycle.compose.collectAsStateWithLifecycle
import dev.gemmaaot.chat.ChatViewModel
import dev.gemmaaot.chat.Screen
import dev.gemmaaot.core.ChatMessage
import dev.gemmaaot.core.Role

@OptIn(ExperimentalMaterial3Api::class)
@Composable
fun ChatScreen(model: ChatViewModel, screen: Screen.Chat) {
    val chat by model.chat.collectAsStateWithLifecycle()
    var showSettings by remember { mutableStateOf(false) }
    var input by remember { mutableStateOf("") }
    val list = rememberLazyListState()
    val shown = chat.messages + listOfNotNull(chat.streaming?.let { ChatMessage(Role.MODEL, it) })
    LaunchedEffect(shown.size, chat.streaming?.length) {
        if (shown.isNotEmpty()) list.animateScrollToItem(shown.size - 1)
    }
    Scaffold(topBar = {
        TopAppBar(
            title = {
                Column {
                    Text(screen.model, style = MaterialTheme.typography.titleMedium)
                    Text("${screen.backend} · ${chat.lastStats ?: "ready"}", style = MaterialTheme.typography.bodySmall)
                }
            },
            actions = {
                TextButton(onClick = model::newChat) { Text("New chat") }
                TextButton(onClick = { showSettings = true }) { Text("Settings") }
            })
    }) { padding ->
        Column(Modifier.fillMaxSize().padding(padding).imePadding()) {
            LazyColumn(Modifier.weight(1f).fillMaxWidth(), state = list,
                       verticalArrangement = Arrangement.spacedBy(8.dp)) {
                items(shown) { Bubble(it) }
            }
            chat.error?.let {
                Text(it, color = MaterialTheme.colorScheme.error, modifier = Modifier.padding(8.dp))
            }
            Row(Modifier.fillMaxWidth().padding(8.dp), verticalAlignment = Alignment.CenterVertically) {
                OutlinedTextField(value = input, onValueChange = { input = it },
                                  modifier = Modifier.weight(1f), placeholder = { Text("Message Gemma") })
                if (chat.generating) {
                    Button(onClick = model::stop, modifier = Modifier.padding(start = 8.dp)) { Text("Stop") }
                } else {
                    Button(onClick = { model.send(input); input = "" }, enabled = input.isNotBlank(),
                           modifier = Modifier.padding(start = 8.dp)) { Text("Send") }
                }
            }
        }
    }
    if (showSettings) SettingsDialog(model) { showSettings = false }
}

@Composable
private fun Bubble(m: ChatMessage) {
    val mine = m.role == Role.USER
    Box(Modifier.fillMaxWidth().padding(horizontal = 8.dp),
        contentAlignment = if (mine) Alignment.CenterEnd else Alignment.CenterStart) {
        Text(m.content.ifEmpty { "…" },
             modifier = Modifier.widthIn(max = 320.dp)
                 .background(if (mine) MaterialTheme.colorScheme.primaryContainer
                             else MaterialTheme.colorScheme.surfaceVariant, RoundedCornerShape(12.dp))
                 .padding(12.dp))
    }
}
